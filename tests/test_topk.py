"""Exact top-k masks: counts, ties, nesting, dtypes, both search methods, and the refresh that
searches from the last thresholds."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topkast_jax import topk
from topkast_jax.topk import (
  kth_largest_keys,
  magnitude_keys,
  refreshed_masks,
  top_keys_masks,
  topk_mask,
  topk_masks,
)


def reference_mask(x, k):
  """Top-k of |x| by a stable sort: ties go to the lowest flat index."""
  order = np.argsort(-np.abs(np.asarray(x, np.float64)).ravel(), kind='stable')
  mask = np.zeros(x.size, bool)
  mask[order[:k]] = True
  return mask.reshape(x.shape)


@pytest.mark.parametrize('method', ['radix', 'bisection'])
@pytest.mark.parametrize('values', ['normal', 'rounded', 'constant', 'with_zeros'])
def test_matches_stable_sort(method, values):
  rng = np.random.default_rng(hash((method, values)) % 2**32)
  x = rng.standard_normal((70_001,)).astype(np.float32)
  if values == 'rounded':
    x = np.round(x * 4) / 4  # heavy ties
  elif values == 'constant':
    x[:] = -0.5
  elif values == 'with_zeros':
    x[rng.random(x.size) < 0.95] = 0.0
  ks = [1, 7_000, 14_000, 69_999]
  masks = jax.jit(lambda a: topk_masks(a, ks, method))(x)
  for k, mask in zip(ks, masks):
    assert int(mask.sum()) == k
    np.testing.assert_array_equal(np.asarray(mask), reference_mask(x, k))


def test_all_equal_weights_take_lowest_indices():
  x = jnp.full((4, 5), 0.3)
  mask = topk_mask(x, 7)
  expected = np.zeros(20, bool)
  expected[:7] = True
  np.testing.assert_array_equal(np.asarray(mask), expected.reshape(4, 5))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_and_shapes(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 3, 8, 16)), dtype)
  mask = topk_mask(x, 115)
  chex.assert_shape(mask, x.shape)
  assert mask.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(mask), reference_mask(np.asarray(x, np.float32), 115))


def test_nested_masks_are_subsets_and_edges():
  rng = np.random.default_rng(1)
  x = jnp.asarray(np.round(rng.standard_normal((50, 40)) * 2), jnp.float32)
  small, large, none, full = topk_masks(x, [200, 600, 0, 2000])
  assert not np.any(np.asarray(small) & ~np.asarray(large))
  assert int(none.sum()) == 0 and int(full.sum()) == 2000


def test_methods_agree_on_thresholds():
  rng = np.random.default_rng(2)
  keys = magnitude_keys(jnp.asarray(rng.standard_normal(100_000), jnp.float32))
  ks = [10, 50_000, 99_999]
  radix = kth_largest_keys(keys, ks, 'radix')
  bisection = kth_largest_keys(keys, ks, 'bisection')
  chex.assert_trees_all_equal(radix, bisection)


def test_magnitude_order_matches_values():
  x = jnp.array([-3.0, 0.0, 1e-30, 2.5, -1e30, jnp.inf], jnp.float32)
  keys = np.asarray(magnitude_keys(x)).astype(np.int64)
  np.testing.assert_array_equal(
    np.argsort(keys, kind='stable'), np.argsort(np.abs(np.asarray(x)), kind='stable')
  )


def test_bad_input():
  with pytest.raises(ValueError, match=r'top-k counts must be in \[0, 6\]'):
    topk_mask(jnp.ones((2, 3)), 7)
  with pytest.raises(ValueError, match='floating-point'):
    topk_mask(jnp.ones((2, 3), jnp.int32), 2)
  with pytest.raises(ValueError, match="method must be 'auto'"):
    topk_mask(jnp.ones((2, 3)), 2, method='sort')
  with pytest.raises(ValueError, match='needs float32 keys'):
    kth_largest_keys(
      jnp.ones(4, jnp.uint64) if jax.config.x64_enabled else jnp.ones(4, jnp.uint16), [1], 'radix'
    )


def drifting(values, shape, steps, seed):
  """Arrays of ``values`` kind that move a little each step, with one jump (a permutation)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  for step in range(steps):
    if values == 'rounded':
      yield np.round(x * 4) / 4  # heavy ties, straddling the thresholds
    elif values == 'with_zeros':
      yield np.where(rng.random(shape) < 0.9, 0.0, x).astype(np.float32)
    elif values == 'with_nan':
      yield np.where(rng.random(shape) < 0.01, np.nan, x).astype(np.float32)
    else:
      yield x
    x = x + 0.003 * rng.standard_normal(shape).astype(np.float32)
    if step == steps // 2:
      x = rng.permutation(x.ravel()).reshape(shape)  # far from the last thresholds


@pytest.mark.parametrize('values', ['normal', 'rounded', 'with_zeros', 'with_nan'])
@pytest.mark.parametrize('max_probes', [1, 16])
def test_refreshed_masks_equal_a_full_search_at_every_step(values, max_probes):
  shape, ks = (3, 48, 40), [0, 192, 384, 1920]  # three stacked layers; k = 0 and k = layer size
  refresh = jax.jit(
    lambda keys, last: refreshed_masks(keys, ks, last, layer_axes=1, max_probes=max_probes)
  )
  thresholds = None
  for x in drifting(values, shape, 12, seed=len(values)):
    keys = magnitude_keys(jnp.asarray(x))
    if thresholds is None:
      masks, thresholds = refreshed_masks(keys, ks, layer_axes=1)
    else:
      masks, thresholds = refresh(keys, thresholds)
    chex.assert_shape(thresholds, (3, 2, len(ks)))
    for k, mask in zip(ks, masks):
      for layer in range(3):
        x_layer = np.where(np.isnan(x[layer]), np.inf, x[layer])  # NaN ranks as the largest
        np.testing.assert_array_equal(np.asarray(mask[layer]), reference_mask(x_layer, k))
    chex.assert_trees_all_equal(masks, top_keys_masks(keys, ks, layer_axes=1))


def test_a_small_move_settles_in_a_few_probes_at_the_exact_threshold():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((256, 64)).astype(np.float32)
  moved = x + 1e-3 * rng.standard_normal(x.shape).astype(np.float32)
  k = 1638
  last = kth_largest_keys(magnitude_keys(jnp.asarray(x)), [k])[0][0]
  keys = magnitude_keys(jnp.asarray(moved))
  threshold, at_or_above, settled, _ = topk._search_from(keys, k, last, last, max_probes=8)
  assert bool(settled)
  assert int(at_or_above) == k  # a threshold with exactly k keys at or above it ...
  assert int(np.sum(np.asarray(keys) >= int(threshold))) == k  # ... which it counted right
  _, _, settled_in_one, _ = topk._search_from(keys, k, last, last, max_probes=1)
  assert not bool(settled_in_one)  # the weights moved: one probe at the old threshold is not enough


def test_refreshed_masks_bad_counts():
  with pytest.raises(ValueError, match=r'top-k counts must be in \[0, 6\]'):
    refreshed_masks(magnitude_keys(jnp.ones((2, 3))), [7])
