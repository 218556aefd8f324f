"""Cheap Top-KAST diagnostics from the optimizer state: densities, mask dynamics, penalty."""

import jax
import jax.numpy as jnp
import optax

from topkast_jax.sparsity import path_name
from topkast_jax.transform import find_topkast_state


def topkast_metrics(opt_state, per_leaf: bool = True) -> dict[str, jax.Array]:
  """Scalar metrics of the Top-KAST state found inside ``opt_state``.

  Overall keys (weighted by leaf size over the sparse leaves): ``forward_density`` (|A| / n),
  ``backward_density`` (|B| / n), ``forward_change`` (share of A replaced at the last refresh),
  ``entered_from_c`` (share of weights that ever moved from C into A since init; the paper's
  Fig. 3), ``penalty`` (the exploration penalty at the last update, summed) and
  ``sparse_weights`` (n). With ``per_leaf``, the same per sparse leaf as ``<path>/<name>``.
  All reductions over boolean masks: a few passes over the masks, cheap to log every step.
  """
  state = find_topkast_state(opt_state)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  named = jax.tree_util.tree_flatten_with_path(state.forward_mask, is_leaf=is_masked)[0]
  leaves = [
    jax.tree_util.tree_leaves(t, is_leaf=is_masked)
    for t in (
      state.forward_mask,
      state.backward_mask,
      state.entered_from_c,
      state.forward_change,
      state.penalty,
    )
  ]
  out = {}
  totals = dict(forward=0.0, backward=0.0, change=0.0, entered=0.0, penalty=0.0, size=0)
  for (path, a), b, entered, change, penalty in zip(named, *leaves[1:]):
    if is_masked(a):
      continue
    n = a.size
    count_a = jnp.sum(a, dtype=jnp.float32)
    stats = {
      'forward_density': count_a / n,
      'backward_density': jnp.sum(b, dtype=jnp.float32) / n,
      'forward_change': change,
      'entered_from_c': jnp.sum(entered, dtype=jnp.float32) / n,
      'penalty': penalty,
    }
    if per_leaf:
      out.update({f'{path_name(path)}/{k}': v for k, v in stats.items()})
    totals['forward'] += count_a
    totals['backward'] += stats['backward_density'] * n
    totals['change'] += change * count_a
    totals['entered'] += stats['entered_from_c'] * n
    totals['penalty'] += penalty
    totals['size'] += n
  size = max(totals['size'], 1)
  out.update(
    forward_density=jnp.asarray(totals['forward'] / size, jnp.float32),
    backward_density=jnp.asarray(totals['backward'] / size, jnp.float32),
    forward_change=jnp.asarray(totals['change'] / jnp.maximum(totals['forward'], 1.0), jnp.float32),
    entered_from_c=jnp.asarray(totals['entered'] / size, jnp.float32),
    penalty=jnp.asarray(totals['penalty'], jnp.float32),
    sparse_weights=jnp.asarray(totals['size'], jnp.int32),
  )
  return out
