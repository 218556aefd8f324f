"""Collectives in the compiled HLO of a jit'd train step on sharded parameters: dense Adam
against Top-KAST (dense-state and compact), FSDP and tensor-parallel layouts.

The step of ``examples/sharded_step.py`` (784-512-256-10 MLP, batch 128 sharded over the
examples) on 8 fake CPU devices; kernels sharded over their rows (FSDP,
``P('x', None)``) or their columns (tensor parallel, ``P(None, 'x')``). Prints, per step, the
number of each collective and of the all-gathers as large as a kernel. FSDP's forward pass
gathers each kernel (its rows are the contracted axis), in the dense step as in Top-KAST's; the
refresh adds none: its collectives reduce histograms, counts and B's vectors.

  python benchmarks/sharded_collectives.py
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import collections  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import topkast_jax  # noqa: E402

SIZES = (784, 512, 256, 10)
KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
LAYOUTS = {'fsdp': P('x', None), 'tensor_parallel': P(None, 'x')}


def collectives(compiled):
  """Count per kind, the all-gathers (or all-to-alls) of at least a kernel's smallest size
  (131,072 = 512 x 256) and the elements all-gathered, in compiled HLO."""
  counts, big, gathered = collections.Counter(), 0, 0
  pattern = r'= (\w+)\[([\d,]*)\][^ ]* (' + '|'.join(KINDS) + r')(?:-start)?\('
  for _, dims, kind in re.findall(pattern, compiled.as_text()):
    counts[kind] += 1
    elements = int(np.prod([int(d) for d in dims.split(',') if d]))
    if kind in ('all-gather', 'all-to-all'):
      big += elements >= SIZES[1] * SIZES[2]
      gathered += elements
  return counts, big, gathered


def params_for(mesh, spec):
  keys = jax.random.split(jax.random.key(0), len(SIZES) - 1)
  params = {}
  for i, (k, d_in, d_out) in enumerate(zip(keys, SIZES[:-1], SIZES[1:])):
    kernel_spec = spec if d_out % mesh.size == 0 else P('x', None)  # 10 columns: rows instead
    params[f'dense_{i}'] = {
      'kernel': jax.device_put(
        jax.random.normal(k, (d_in, d_out)), NamedSharding(mesh, kernel_spec)
      ),
      'bias': jax.device_put(jnp.zeros(d_out), NamedSharding(mesh, P())),
    }
  return params


def loss_fn(params, x, y):
  for i in range(len(SIZES) - 1):
    layer = params[f'dense_{i}']
    x = x @ layer['kernel'] + layer['bias']
    x = jax.nn.relu(x) if i < len(SIZES) - 2 else x
  return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def compiled_step(tx, params, x, y, sparse):
  def step(params, state, x, y):
    at = topkast_jax.sparse_params(params, state) if sparse else params
    updates, state = tx.update(jax.grad(loss_fn)(at, x, y), state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  return jax.jit(step).lower(params, state, x, y).compile()


def main():
  # An automatic mesh: XLA shards the model's activations (an explicit mesh would need the
  # model to say how); tests/test_sharding.py checks the refresh on explicit meshes.
  mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Auto,))
  print(f'jax {jax.__version__}, {jax.device_count()} devices, automatic mesh')
  sparse = dict(forward_sparsity=0.9, backward_sparsity=0.8, exploration_l2=1e-4)
  steps = {
    'dense adam': (optax.adam(1e-3), False),
    'topkast dense-state': (topkast_jax.topkast(optax.adam(1e-3), **sparse), True),
    'topkast compact': (
      topkast_jax.topkast(optax.adam(1e-3), compact_inner_state=True, **sparse),
      True,
    ),
  }
  print(
    '| layout | step | '
    + ' | '.join(KINDS)
    + ' | all-gathers of a kernel | elements all-gathered |'
  )
  print('|---|---|' + '---|' * (len(KINDS) + 2))
  for layout, spec in LAYOUTS.items():
    batch = P('x') if layout == 'fsdp' else P()  # FSDP: data parallel too
    x = jax.device_put(jnp.ones((128, SIZES[0])), NamedSharding(mesh, batch))
    y = jax.device_put(jnp.zeros(128, jnp.int32), NamedSharding(mesh, batch))
    params = params_for(mesh, spec)
    for name, (tx, is_sparse) in steps.items():
      counts, big, gathered = collectives(compiled_step(tx, params, x, y, is_sparse))
      cells = ' | '.join(str(counts[k]) for k in KINDS)
      print(f'| {layout} | {name} | {cells} | {big} | {gathered:,} |')


if __name__ == '__main__':
  main()
