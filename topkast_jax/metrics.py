"""Cheap diagnostics of any sparse method's state: densities and mask dynamics."""

import jax
import jax.numpy as jnp

from topkast_jax import bitmask
from topkast_jax.sparsity import path_name
from topkast_jax.states import find_sparse_state, is_masked


def sparsity_metrics(opt_state, per_leaf: bool = True) -> dict[str, jax.Array]:
  """Scalar metrics of the sparse-method state found inside ``opt_state`` (any method).

  Overall keys (weighted by leaf size over the sparse leaves): ``forward_density`` (share of
  weights in use), ``backward_density`` (``|B| / n``; the forward density for the baselines) and
  ``sparse_weights`` (n). With ``track_mask_changes=True`` (every method takes it) also
  ``forward_change`` (share of the mask new at its last change; zero for static masks and for
  magnitude pruning, which only removes) and ``entered_from_c`` (share of weights that ever
  moved from C into A; the paper's Fig. 3). With ``per_leaf``, the same per sparse leaf as
  ``<path>/<name>``. All reductions over masks (bit counts): cheap to log every step. Top-KAST's
  penalty is `topkast_jax.exploration_penalty`.
  """
  state = find_sparse_state(opt_state)
  tracked = state.forward_change is not None  # None without track_mask_changes
  fields = ['backward_mask'] + (['forward_change', 'entered_from_c'] if tracked else [])
  columns = {f: jax.tree_util.tree_leaves(getattr(state, f), is_leaf=is_masked) for f in fields}
  named = jax.tree_util.tree_flatten_with_path(state.forward_mask, is_leaf=is_masked)[0]
  out, totals, size = {}, {}, 0
  for i, (path, a) in enumerate(named):
    if is_masked(a):
      continue
    leaf = {f: column[i] for f, column in columns.items()}
    n, count = bitmask.size(a), bitmask.count(a).astype(jnp.float32)
    # (numerator, denominator): a leaf's value is their ratio, the overall value the ratio of
    # their sums.
    parts = {'forward_density': (count, n)}
    parts['backward_density'] = (bitmask.count(leaf['backward_mask']).astype(jnp.float32), n)
    if tracked:
      parts['forward_change'] = (leaf['forward_change'] * count, count)
      parts['entered_from_c'] = (bitmask.count(leaf['entered_from_c']).astype(jnp.float32), n)
    for key, (num, den) in parts.items():
      if per_leaf:
        out[f'{path_name(path)}/{key}'] = num / jnp.maximum(den, 1)
      total = totals.setdefault(key, [0.0, 0.0])
      total[0] += num
      total[1] += den
    size += n
  for key, (num, den) in totals.items():
    out[key] = jnp.asarray(num / jnp.maximum(den, 1.0), jnp.float32)
  out['sparse_weights'] = jnp.asarray(size, jnp.int32)
  return out
