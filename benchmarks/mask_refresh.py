"""Times one Top-KAST mask refresh of a ResNet-50-shaped pytree against sort-based baselines.

All three methods compute, for every kernel (ndim >= 2), the exact top-k masks at forward
sparsity 0.9 (A) and backward sparsity 0.8 (B) from the same float32 arrays, and each is
checked against the others. Prints median wall times and the ratio of topkast_jax's time to
numpy's argpartition time, measured in the same run.

Then the steady state of training: the refresh that starts from the last refresh's thresholds
(`topk.refreshed_masks`, what Top-KAST runs every step), after every weight moved by
``--move`` times its kernel's scale, against the floor: one fused compare-and-count pass of
``|theta| >= t`` over the same kernels. Both in ns per weight, and their ratio.

Last, the structured selections Top-KAST runs at init (A and B of every kernel but the first
conv, whose 3 input channels no group or block divides): N:M 1:8 / 2:8 (a rank inside each
group) and 4 x 4 blocks at 0.9 / 0.8 (block norms, then the top-k search over blocks), against
the unstructured search at the same densities, in ns per weight.

  python benchmarks/mask_refresh.py [--repeats 5] [--argsort-repeats 2] [--width-divisor 1]
      [--kernels 0]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from topkast_jax.sparsity import LeafSparsity
from topkast_jax.structure import NM, Blocks
from topkast_jax.topk import magnitude_keys, refreshed_masks, topk_masks
from topkast_jax.transform import _top_masks

FORWARD_DENSITY = 0.1
BACKWARD_DENSITY = 0.2


def resnet50_shapes(divisor=1):
  """Parameter shapes of torchvision-style ResNet-50 v1.5 (HWIO kernels): 25,557,032 numbers;
  every channel width divided by ``divisor``."""
  in_ch = 64 // divisor
  shapes = {'conv1': (7, 7, 3, in_ch), 'bn1_scale': (in_ch,), 'bn1_bias': (in_ch,)}
  for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)]):
    width //= divisor
    for b in range(blocks):
      name = f'stage{stage + 1}_block{b + 1}'
      for i, (ks, cin, cout) in enumerate(
        [(1, in_ch, width), (3, width, width), (1, width, 4 * width)]
      ):
        shapes[f'{name}_conv{i + 1}'] = (ks, ks, cin, cout)
        shapes[f'{name}_bn{i + 1}_scale'] = shapes[f'{name}_bn{i + 1}_bias'] = (cout,)
      if b == 0:
        shapes[f'{name}_proj'] = (1, 1, in_ch, 4 * width)
        shapes[f'{name}_proj_bn_scale'] = shapes[f'{name}_proj_bn_bias'] = (4 * width,)
      in_ch = 4 * width
  shapes['fc'] = (in_ch, 1000)
  shapes['fc_bias'] = (1000,)
  return shapes


def counts(n):
  return int(np.floor(FORWARD_DENSITY * n + 0.5)), int(np.floor(BACKWARD_DENSITY * n + 0.5))


def numpy_argpartition(kernels):
  masks = {}
  for name, x in kernels.items():
    k_a, k_b = counts(x.size)
    order = np.argpartition(-np.abs(x).ravel(), [k_a - 1, k_b - 1])
    a = np.zeros(x.size, bool)
    b = np.zeros(x.size, bool)
    a[order[:k_a]] = True
    b[order[:k_b]] = True
    masks[name] = (a.reshape(x.shape), b.reshape(x.shape))
  return masks


@jax.jit
def jnp_argsort(kernels):
  masks = {}
  for name, x in kernels.items():
    k_a, k_b = counts(x.size)
    ranks = (
      jnp.zeros(x.size, jnp.int32)
      .at[jnp.argsort(-jnp.abs(x).ravel())]
      .set(jnp.arange(x.size, dtype=jnp.int32))
    )
    masks[name] = ((ranks < k_a).reshape(x.shape), (ranks < k_b).reshape(x.shape))
  return masks


@jax.jit
def topkast_topk(kernels):
  return {name: topk_masks(x, counts(x.size)) for name, x in kernels.items()}


@jax.jit
def first_thresholds(kernels):
  return {n: refreshed_masks(magnitude_keys(x), counts(x.size))[1] for n, x in kernels.items()}


@jax.jit
def refresh_from(kernels, thresholds):
  return {
    name: refreshed_masks(magnitude_keys(x), counts(x.size), thresholds[name])
    for name, x in kernels.items()
  }


@jax.jit
def one_pass(kernels):
  """The floor: one compare-and-count pass over each kernel."""
  return {name: jnp.sum(jnp.abs(x) >= 0.05, dtype=jnp.int32) for name, x in kernels.items()}


STRUCTURES = {
  'unstructured 0.875 / 0.75': LeafSparsity(0.875, 0.75),
  'N:M 1:8 / 2:8': LeafSparsity(0.875, 0.75, structure=NM(1, 8)),
  'unstructured 0.9 / 0.8': LeafSparsity(0.9, 0.8),
  'blocks 4x4, 0.9 / 0.8': LeafSparsity(0.9, 0.8, structure=Blocks(4, 4)),
}


def structured_selections(kernels_np, repeats):
  """Seconds of Top-KAST's first selection (A and B) of every kernel but conv1, per
  `STRUCTURES` entry; checks every N:M group and block count."""
  kernels = jax.device_put({n: x for n, x in kernels_np.items() if n != 'conv1'})
  seconds = {}
  for label, spec in STRUCTURES.items():
    select = jax.jit(lambda ks, spec=spec: {n: _top_masks(x, spec)[:2] for n, x in ks.items()})
    found = jax.device_get(select(kernels))
    for name, (a, b) in found.items():
      want_a, want_b = spec.layer_counts(a.shape)
      if (a.sum(), b.sum()) != (want_a, want_b) or (a & ~b).any():
        raise AssertionError(f'{label}: wrong counts on {name}')
      if isinstance(spec.structure, NM):
        groups = np.moveaxis(a, -2, -1).reshape(-1, spec.structure.m).sum(axis=1)
        if (groups != spec.structure.n).any():
          raise AssertionError(f'{label}: a group of {name} does not hold n')
    seconds[label] = median_seconds(select, kernels, repeats=repeats)
  return seconds, sum(x.size for x in kernels.values())


def median_seconds(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def steady_state(kernels_np, move, repeats, rng):
  """Times the refresh from the last thresholds after two small moves of every weight."""
  moves = [
    rng.standard_normal(x.shape).astype(np.float32) * move * 0.05 for x in kernels_np.values()
  ]
  before = {n: x - 2 * m for (n, x), m in zip(kernels_np.items(), moves)}
  last = {n: x - m for (n, x), m in zip(kernels_np.items(), moves)}
  thresholds = first_thresholds(before)
  thresholds = {n: v[1] for n, v in refresh_from(last, thresholds).items()}
  found = jax.device_get(refresh_from(kernels_np, thresholds))
  reference = numpy_argpartition(kernels_np)
  for name in kernels_np:
    for mine, theirs in zip(found[name][0], reference[name]):
      if not np.array_equal(mine, theirs):
        raise AssertionError(f'refreshed masks differ from argpartition on {name}')
  kernels = jax.device_put(kernels_np)
  return (
    median_seconds(refresh_from, kernels, thresholds, repeats=repeats),
    median_seconds(one_pass, kernels, repeats=repeats),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--argsort-repeats', type=int, default=2)
  parser.add_argument('--width-divisor', type=int, default=1, help='a smaller ResNet-50')
  parser.add_argument('--move', type=float, default=1e-3, help='per refresh, times the scale')
  parser.add_argument('--kernels', type=int, default=0, help='the first N kernels; 0: all')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  shapes = resnet50_shapes(args.width_divisor)
  total = sum(int(np.prod(s)) for s in shapes.values())
  kernels_np = {
    n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in shapes.items() if len(s) >= 2
  }
  kernels_np = dict(list(kernels_np.items())[: args.kernels or None])
  kernels_jax = jax.device_put(kernels_np)
  sparse = sum(x.size for x in kernels_np.values())
  print(
    f'ResNet-50 shapes{f" (widths / {args.width_divisor})" if args.width_divisor > 1 else ""}: '
    f'{total:,} parameters, {len(kernels_np)} kernels with {sparse:,} '
    f'weights; forward density {FORWARD_DENSITY}, backward density {BACKWARD_DENSITY}; '
    f'jax {jax.__version__} on {jax.devices()[0].platform}'
  )

  ours = jax.device_get(topkast_topk(kernels_jax))
  reference = numpy_argpartition(kernels_np)
  for name in kernels_np:
    for mine, theirs in zip(ours[name], reference[name]):
      if not np.array_equal(mine, theirs):
        raise AssertionError(f'masks differ from argpartition on {name}')

  t_ours = median_seconds(topkast_topk, kernels_jax, repeats=args.repeats)
  t_numpy = median_seconds(numpy_argpartition, kernels_np, repeats=args.repeats)
  t_sort = median_seconds(jnp_argsort, kernels_jax, repeats=args.argsort_repeats)
  print(f'topkast_jax top-k       median {t_ours * 1e3:9.1f} ms')
  print(f'numpy argpartition      median {t_numpy * 1e3:9.1f} ms')
  print(f'jnp.argsort             median {t_sort * 1e3:9.1f} ms')
  print(f'ratio_vs_jnp_argsort={t_ours / t_sort:.3f}')
  print(f'ratio_vs_numpy_argpartition={t_ours / t_numpy:.3f}')

  t_refresh, t_pass = steady_state(kernels_np, args.move, args.repeats, rng)
  per_weight = lambda t: t / sparse * 1e9  # noqa: E731
  print(f'steady state, every weight moved by {args.move:g} x scale since the last refresh:')
  print(f'refresh from the last thresholds   {per_weight(t_refresh):6.3f} ns/weight')
  print(f'one compare-and-count pass         {per_weight(t_pass):6.3f} ns/weight')
  print(f'ratio_refresh_vs_one_pass={t_refresh / t_pass:.3f}')

  seconds, weights = structured_selections(kernels_np, args.repeats)
  print('first selection (A and B), every kernel but conv1:')
  for label, t in seconds.items():
    print(f'{label:34s} {t / weights * 1e9:6.3f} ns/weight')
  unstructured = lambda d: seconds[f'unstructured {d}']  # noqa: E731
  print(f'ratio_nm_vs_unstructured={seconds["N:M 1:8 / 2:8"] / unstructured("0.875 / 0.75"):.3f}')
  blocks = seconds['blocks 4x4, 0.9 / 0.8'] / unstructured('0.9 / 0.8')
  print(f'ratio_blocks_vs_unstructured={blocks:.3f}')


if __name__ == '__main__':
  main()
