"""Test setup: 8 fake CPU devices for pmap (set before jax is imported), and tiny data sets.

No persistent compilation cache: with jax 0.10.2 on CPU, reading back an executable the same
session wrote crashed the test process (a segfault, then an abort, in
``compilation_cache.get_executable_and_time``) in two of the last four full runs.
"""

import os
import zipfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402


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


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """Drops each module's compiled programs when it ends: a long session otherwise holds every
  executable it built, and the 8-device compile of a later driver test crashed (segfault in
  ``backend_compile_and_load``) after the baselines' and driver tests had run in one process."""
  yield
  import jax

  jax.clear_caches()
