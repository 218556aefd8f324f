"""The core install: `import topkast_jax` and a Top-KAST step need only jax, optax, chex, numpy
(absl-py comes with optax and chex)."""

import importlib.metadata
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT_PACKAGES = (
  'flax grain orbax ml_collections tensorflow_datasets tensorboardX matplotlib PIL '
  'array_record tensorflow'
).split()

CORE_ONLY = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {EXPERIMENT_PACKAGES!r}:
      raise ImportError('not in the core install: ' + name)
sys.meta_path.insert(0, Block())
import jax, jax.numpy as jnp, optax, topkast_jax
params = {{'w': jnp.arange(20.0).reshape(4, 5), 'b': jnp.zeros(5)}}
tx = topkast_jax.topkast(optax.sgd(0.1), forward_sparsity=0.5, backward_sparsity=0.25)
state = tx.init(params)
loss, grads = topkast_jax.sparse_value_and_grad(lambda p: jnp.sum(p['w'] ** 2))(params, state)
updates, state = tx.update(grads, state, params)
print(float(topkast_jax.sparsity_metrics(state)['forward_density']), topkast_jax.__version__)
"""


def test_core_imports_and_runs_without_the_experiment_stack():
  out = subprocess.run(
    [sys.executable, '-c', CORE_ONLY], capture_output=True, text=True, cwd=ROOT, check=True
  )
  density, version = out.stdout.split()
  assert float(density) == 0.5
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  assert sorted(project['dependencies']) == ['chex', 'jax', 'numpy', 'optax']
  installed = importlib.metadata.version('topkast_jax')  # the editable install's metadata
  assert installed == version  # one place for the version: the package


MISSING_FLAX = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'flax':
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, Absent())
for module in ('topkast_jax.models', 'topkast_jax.training.train', 'topkast_jax.data.sources'):
  try:
    __import__(module)
  except ModuleNotFoundError as e:
    print(e)
"""


def test_a_missing_extra_is_named():
  out = subprocess.run(
    [sys.executable, '-c', MISSING_FLAX], capture_output=True, text=True, cwd=ROOT, check=True
  ).stdout.splitlines()
  assert out == [
    f'topkast_jax.{m} needs flax, which the core install of topkast_jax leaves out. Install the '
    f"extra: pip install 'topkast_jax[{extra}]'."
    for m, extra in (
      ('models', 'models'),
      ('training', 'experiments'),
      ('data.sources', 'experiments'),
    )
  ], out
