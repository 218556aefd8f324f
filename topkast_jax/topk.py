"""Exact top-k magnitude masks by bisection over float bit patterns, without sorting.

For non-negative IEEE-754 floats the unsigned-integer view of the bits is ordered like the
values. The k-th largest key is the largest threshold ``t`` with ``count(keys >= t) >= k``;
it is built one bit at a time from the most significant bit, each bit costing one
compare-and-count pass over the array (31 passes for float32, whatever k is). Entries equal to
the threshold are taken in flat (C-order) index order, lowest first, so a mask holds exactly k
entries even when magnitudes tie.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def magnitude_keys(x: jax.Array) -> jax.Array:
  """Flat unsigned-integer keys ordered like ``|x|`` (NaN counts as the largest magnitude)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'magnitude_keys needs a floating-point array, got dtype {x.dtype}.')
  if x.dtype == jnp.float64:
    return jax.lax.bitcast_convert_type(jnp.abs(x), jnp.uint64).reshape(-1)
  # float16 and bfloat16 widen to float32 exactly, keeping their order.
  return jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32).reshape(-1)


def _bisection_search(keys, ks):
  """One compare-and-count pass per key bit, for all k at once."""
  n = keys.shape[0]
  value_bits = np.iinfo(keys.dtype).bits - 1
  one = jnp.ones((), keys.dtype)
  k_vec = jnp.asarray(ks, jnp.int32)

  def try_next_bit(i, carry):
    thresholds, counts = carry
    bit = (value_bits - 1 - i).astype(keys.dtype)
    candidates = thresholds | (one << bit)
    candidate_counts = jnp.sum(keys[None, :] >= candidates[:, None], axis=1, dtype=jnp.int32)
    accept = candidate_counts >= k_vec
    return (
      jnp.where(accept, candidates, thresholds),
      jnp.where(accept, candidate_counts, counts),
    )

  start = (jnp.zeros(len(ks), keys.dtype), jnp.full(len(ks), n, jnp.int32))
  return jax.lax.fori_loop(0, value_bits, try_next_bit, start)


_LOW_BITS = 15  # float32 keys: 16 high bits (top one always zero), then 15 low bits.


def _radix_search(keys, ks):
  """Two histogram passes over 31-bit keys: high digit for every k, then each k's low digit."""
  k_vec = jnp.asarray(ks, jnp.int32)
  high = (keys >> _LOW_BITS).astype(jnp.int32)
  high_hist = jnp.zeros(1 << (31 - _LOW_BITS), jnp.int32).at[high].add(1)
  at_or_above = jnp.cumsum(high_hist[::-1])[::-1]
  bucket = jnp.sum(at_or_above[None, :] >= k_vec[:, None], axis=1) - 1
  strictly_above = at_or_above[bucket] - high_hist[bucket]
  thresholds, counts = [], []
  for i, k in enumerate(ks):
    # Keys outside the chosen bucket go to an overflow bin that is dropped.
    low = jnp.where(
      high == bucket[i], (keys & ((1 << _LOW_BITS) - 1)).astype(jnp.int32), 1 << _LOW_BITS
    )
    low_hist = jnp.zeros((1 << _LOW_BITS) + 1, jnp.int32).at[low].add(1)[:-1]
    low_at_or_above = jnp.cumsum(low_hist[::-1])[::-1] + strictly_above[i]
    digit = jnp.sum(low_at_or_above >= k) - 1
    thresholds.append((bucket[i].astype(jnp.uint32) << _LOW_BITS) | digit.astype(jnp.uint32))
    counts.append(low_at_or_above[digit])
  return jnp.stack(thresholds), jnp.stack(counts)


def kth_largest_keys(
  keys: jax.Array, ks: Sequence[int], method: str = 'auto'
) -> tuple[jax.Array, jax.Array]:
  """Finds, for each k in ``ks``, the k-th largest key and how many keys are >= it.

  Args:
    keys: 1-D unsigned-integer array whose top bit is zero (see `magnitude_keys`).
    ks: counts, each in [1, keys.size]: Python ints or traced int32 scalars.
    method: ``'radix'`` (two scatter-add histogram passes; float32 keys only), ``'bisection'``
      (one compare-and-count pass per bit; no scatter, which suits TPUs) or ``'auto'``: radix
      for float32 arrays of at least 65536 entries off TPU, bisection otherwise.

  Returns:
    ``(thresholds, counts_at_or_above)``, each of shape ``[len(ks)]``.
  """
  n = keys.shape[0]
  if not ks or any(isinstance(k, int) and not 1 <= k <= n for k in ks):
    raise ValueError(f'each k must be in [1, {n}], got {list(ks)}.')
  if method == 'auto':
    radix_fits = keys.dtype == jnp.uint32 and n >= 1 << 16
    method = 'radix' if radix_fits and jax.default_backend() != 'tpu' else 'bisection'
  if method == 'radix':
    if keys.dtype != jnp.uint32:
      raise ValueError(f"method='radix' needs float32 keys (uint32), got {keys.dtype}.")
    return _radix_search(keys, ks)
  if method == 'bisection':
    return _bisection_search(keys, ks)
  raise ValueError(f"method must be 'auto', 'radix' or 'bisection', got {method!r}.")


def _mask_at_threshold(keys, threshold, count_at_or_above, k):
  """The k largest keys: all above the threshold, then ties in index order."""

  def without_straddling_ties():
    return keys >= threshold

  def with_straddling_ties():
    at = keys == threshold
    needed = k - jnp.sum(keys > threshold, dtype=jnp.int32)
    return (keys > threshold) | (at & (jnp.cumsum(at, dtype=jnp.int32) <= needed))

  # The prefix sum costs more than the whole search, so it only runs when ties cross the cut.
  return jax.lax.cond(count_at_or_above == k, without_straddling_ties, with_straddling_ties)


def topk_masks(x: jax.Array, ks: Sequence[int], method: str = 'auto') -> tuple[jax.Array, ...]:
  """Boolean masks of the exact top-k entries of ``|x|`` for each static k in ``ks``.

  One search finds every threshold together, so nested masks (Top-KAST's A within B) cost
  about as much as one. Ties are broken by flat index, lowest first; masks for a smaller k
  are therefore always subsets of masks for a larger k.

  Args:
    x: floating-point array of any shape.
    ks: Python ints in [0, x.size].
    method: search method, see `kth_largest_keys`.

  Returns:
    One boolean array shaped like ``x`` per entry of ``ks``, with exactly k True entries.
  """
  ks = [int(k) for k in ks]
  n = int(np.prod(x.shape))
  if any(not 0 <= k <= n for k in ks):
    raise ValueError(f'top-k counts must be in [0, {n}] for an array of shape {x.shape}, got {ks}.')
  searched = [k for k in ks if 0 < k < n]
  masks = {0: jnp.zeros(x.shape, bool), n: jnp.ones(x.shape, bool)}
  if searched:
    keys = magnitude_keys(x)
    thresholds, counts = kth_largest_keys(keys, searched, method)
    for i, k in enumerate(searched):
      masks[k] = _mask_at_threshold(keys, thresholds[i], counts[i], k).reshape(x.shape)
  return tuple(masks[k] for k in ks)


def top_keys_mask(keys: jax.Array, k, method: str = 'auto') -> jax.Array:
  """Flat mask of the ``k`` largest ``keys`` (ties: lowest index); ``k`` may be traced.

  ``keys`` as for `kth_largest_keys`; ``k`` an int or int32 scalar in [0, keys.size] (a count
  outside is clipped). The mask holds exactly ``k`` entries.
  """
  k = jnp.asarray(k, jnp.int32)
  searched = jnp.clip(k, 1, keys.shape[0])
  thresholds, counts = kth_largest_keys(keys, [searched], method)
  return _mask_at_threshold(keys, thresholds[0], counts[0], searched) & (k > 0)


def topk_mask(x: jax.Array, k: int, method: str = 'auto') -> jax.Array:
  """Boolean mask of the exact k largest-magnitude entries of ``x`` (ties: lowest index)."""
  return topk_masks(x, [k], method)[0]
