"""Test setup: 8 fake CPU devices for pmap (set before jax is imported), and tiny data sets.

Compiled programs are dropped after each test module (``jax.clear_caches``): every CPU
executable keeps its code mapped, and a session that holds all of them heads for the kernel's
limit of 65530 memory maps (``vm.max_map_count``). Without clearing, the process crashed in
the module after ``test_experiments.py`` (segfault in ``backend_compile_and_load``, or in
``get_executable_and_time`` with a persistent compilation cache), in three of four full runs;
``test_experiments.py`` alone ends at 38,164 maps, and clearing brings them to 1,156.
A compilation cache shared by the run's processes (both pytest-xdist workers and the
subprocesses they start), under pytest's temporary directory, spares repeated compiles.
"""

import os
import zipfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope='session')
def _compilation_cache(tmp_path_factory):
  """One compilation cache per run, in the directory pytest keeps for it (the last 3 runs)."""
  run_dir = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):  # <run>/popen-gw<i>: share the run's directory
    run_dir = run_dir.parent
  path = str(run_dir / 'jax_compilation_cache')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path  # for subprocesses
  import jax

  jax.config.update('jax_compilation_cache_dir', path)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """Tiny real-format copies of the data sets that can be prepared offline."""
  from test_image_data import write_fashion_mnist
  from test_text_data import write_wikitext

  from topkast_jax.data import sources

  root = tmp_path_factory.mktemp('data')
  data_dir = str(root / 'tfds')
  write_fashion_mnist(str(root), n_train=64, n_test=20)
  sources.prepare('fashion_mnist', data_dir, idx_dir=str(root))
  text = ('The quick brown fox jumps over the lazy dog. ' * 400).encode()
  with zipfile.ZipFile(root / 'enwik8.zip', 'w') as archive:
    archive.writestr('enwik8', text)
  sources.prepare('enwik8', data_dir, source=str(root / 'enwik8.zip'), num_test_bytes=1500)
  write_wikitext(str(root / 'wikitext-103'))
  for name in ('wiki.train.tokens', 'wiki.valid.tokens', 'wiki.test.tokens'):
    path = root / 'wikitext-103' / name
    path.write_text(path.read_text() * 40)
  sources.prepare('wikitext103', data_dir, source=str(root / 'wikitext-103'))
  speeches = root / 'speeches'
  speeches.mkdir()
  for i in range(40):
    (speeches / f'{1900 + i}-X-1.txt').write_text(f'Address {i}: the state of the union. ' * 30)
  sources.prepare('sotu', data_dir, source=str(speeches))
  return data_dir


@pytest.fixture
def one_block_resnets(monkeypatch):
  """The driver's ResNets with one block per stage: what the driver does with a ResNet does
  not depend on its depth, and compiling the full depth took most of these tests' time
  (ResNet-50: 16 blocks)."""
  from one_block_main import one_block_resnets

  from topkast_jax.training import classification

  for name, model in one_block_resnets().items():
    monkeypatch.setitem(classification.RESNETS, name, model)


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """Drops each module's compiled programs when it ends (see the module docstring)."""
  yield
  import jax

  jax.clear_caches()
