"""Sparse export: file size against the dense checkpoint, and inference time against dense.

File size: ResNet-50 shapes (25.6M parameters; first conv and classifier dense, as the paper),
weights drawn at random, masks from `topkast_jax.topkast` at each forward sparsity. The dense
checkpoint is ``numpy.savez`` of the params; the export is `topkast_jax.export.save_npz`
(values + flat int32 indices per sparse kernel). Loading it back is checked equal to
``sparse_params`` exactly.

Structured layouts, same shapes: the N:M export (kept values + a uint8 slot per value) at
2:4, 1:4 and 1:8 and the block-CSR export at 4 x 4 and 16 x 16 blocks (forward sparsity 0.9),
each against dense and against the unstructured export (values + int32 indices) at the same
sparsity, every one loaded back and checked equal to ``sparse_params``.

Inference: an MLP (inputs 1024, two hidden layers of 4096, 1000 outputs, batch 64) run with
dense kernels and with the exported BCOO kernels (``jax.experimental.sparse.sparsify``), both
jitted, timed in interleaved rounds in this run.

  python benchmarks/sparse_export.py [--rounds 7] [--sparsities 0.8,0.9,0.95]
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import topkast_jax  # noqa: E402
from topkast_jax import export, models  # noqa: E402
from topkast_jax.sparsity import path_name  # noqa: E402

SPARSITIES = (0.8, 0.9, 0.95)


def random_like(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def file_sizes(folder, sparsities):
  model = models.ResNet50(num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  params = random_like(shapes)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  dense_path = os.path.join(folder, 'dense.npz')
  np.savez(dense_path, **{path_name(p): x for p, x in leaves})
  dense_bytes = os.path.getsize(dense_path)
  print(f'ResNet-50 shapes: {sum(x.size for _, x in leaves):,} parameters')
  print(f'  dense checkpoint (numpy.savez)     {dense_bytes / 2**20:8.1f} MiB  ratio 1.000')
  for s in sparsities:
    tx = topkast_jax.topkast(
      optax.sgd(0.1), forward_sparsity=s, backward_sparsity=0.0, sparsity=models.resnet_sparsity()
    )
    state = jax.jit(tx.init)(params)
    path = os.path.join(folder, f'sparse_{s}.npz')
    export.save_npz(path, params, state)
    loaded = export.load_npz(path, like=params)
    alpha = jax.device_get(topkast_jax.sparse_params(params, state))
    assert all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(alpha))
    )
    size = os.path.getsize(path)
    print(
      f'  export at forward sparsity {s:<5}   {size / 2**20:8.1f} MiB  '
      f'ratio {size / dense_bytes:.3f}  (loads back to alpha exactly)'
    )


STRUCTURED = [
  (topkast_jax.NM(2, 4), 0.5),
  (topkast_jax.NM(1, 4), 0.75),
  (topkast_jax.NM(1, 8), 0.875),
  (topkast_jax.Blocks(4, 4), 0.9),
  (topkast_jax.Blocks(16, 16), 0.9),
]


def exported_bytes(path, params, sparsity, structure=None):
  """Size of the export at ``sparsity`` (with ``structure``), checked to load back exactly."""
  tx = topkast_jax.topkast(
    optax.sgd(0.1),
    forward_sparsity=sparsity,
    backward_sparsity=0.0,
    sparsity=models.resnet_sparsity(),
    structure=structure,
  )
  state = jax.jit(tx.init)(params)
  export.save_npz(path, params, state, structure=structure)
  loaded = export.load_npz(path, like=params)
  alpha = jax.device_get(topkast_jax.sparse_params(params, state))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(alpha)))
  return os.path.getsize(path)


def structured_sizes(folder, structures):
  model = models.ResNet50(num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  params = random_like(shapes)
  dense = os.path.getsize(os.path.join(folder, 'dense.npz'))
  print('structured exports, same shapes (all load back to alpha exactly):')
  for structure, level in structures:
    unstructured = exported_bytes(os.path.join(folder, 'u.npz'), params, level)
    size = exported_bytes(os.path.join(folder, 's.npz'), params, level, structure)
    kind = 'N:M ' if isinstance(structure, topkast_jax.NM) else ''
    print(
      f'  {kind + str(structure):16s} at {level:<5}  {size / 2**20:8.1f} MiB  '
      f'ratio_vs_dense={size / dense:.3f}  ratio_vs_unstructured={size / unstructured:.3f}'
    )


def mlp(params, x):
  for i, layer in enumerate(params):
    x = x @ layer['kernel'] + layer['bias']
    if i < len(params) - 1:
      x = jnp.maximum(x, 0.0)  # not jax.nn.relu: sparsify cannot trace its custom_jvp
  return x


def median_ms(fn, args, rounds, calls=10):
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls * 1e3)
  return float(np.median(times))


def inference(rounds, sparsities):
  sizes = (1024, 4096, 4096, 1000)
  rng = np.random.default_rng(0)
  params = [
    {
      'kernel': rng.standard_normal((a, b), np.float32) / np.sqrt(a),
      'bias': np.zeros(b, np.float32),
    }
    for a, b in zip(sizes[:-1], sizes[1:])
  ]
  x = jnp.asarray(rng.standard_normal((64, sizes[0]), np.float32))
  print(f'MLP {sizes}, batch 64, {rounds} rounds x 10 calls, jax {jax.__version__} on cpu')
  dense_fn, sparse_fn = jax.jit(mlp), jax.jit(sparse.sparsify(mlp))
  for s in sparsities:
    tx = topkast_jax.topkast(optax.sgd(0.1), forward_sparsity=s, backward_sparsity=0.0)
    state = tx.init(params)
    alpha = topkast_jax.sparse_params(params, state)
    exported = export.export_sparse(params, state)
    np.testing.assert_allclose(sparse_fn(exported, x), dense_fn(alpha, x), rtol=1e-4, atol=1e-4)
    dense_ms, sparse_ms = [], []
    for _ in range(2):  # interleaved
      dense_ms.append(median_ms(dense_fn, (alpha, x), rounds))
      sparse_ms.append(median_ms(sparse_fn, (exported, x), rounds))
    d, sp = min(dense_ms), min(sparse_ms)
    print(
      f'  forward sparsity {s:<5} dense {d:8.2f} ms  exported BCOO {sp:8.2f} ms  '
      f'ratio_vs_dense={sp / d:.2f}'
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--sparsities', default=','.join(map(str, SPARSITIES)))
  parser.add_argument('--structures', type=int, default=len(STRUCTURED), help='how many to run')
  args = parser.parse_args()
  sparsities = [float(s) for s in args.sparsities.split(',')]
  with tempfile.TemporaryDirectory() as folder:
    file_sizes(folder, sparsities)
    structured_sizes(folder, STRUCTURED[: args.structures])
  inference(args.rounds, sparsities)


if __name__ == '__main__':
  main()
