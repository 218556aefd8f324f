"""Cheap diagnostics of any sparse method's state: densities, mask dynamics, penalty."""

import jax
import jax.numpy as jnp

from topkast_jax.sparsity import path_name
from topkast_jax.states import TopKastState, find_sparse_state, is_masked


def sparsity_metrics(opt_state, per_leaf: bool = True) -> dict[str, jax.Array]:
  """Scalar metrics of the sparse-method state found inside ``opt_state`` (any method).

  Overall keys (weighted by leaf size over the sparse leaves): ``forward_density`` (share of
  weights in use), ``forward_change`` (share of the mask new at its last update; zero for
  static masks and for magnitude pruning, which only removes) and ``sparse_weights`` (n).
  Top-KAST adds ``backward_density`` (|B| / n), ``entered_from_c`` (share of weights that ever
  moved from C into A; the paper's Fig. 3) and ``penalty`` (the exploration penalty at the last
  update, summed). With ``per_leaf``, the same per sparse leaf as ``<path>/<name>``. All
  reductions over boolean masks: cheap to log every step.
  """
  state = find_sparse_state(opt_state)
  topkast = isinstance(state, TopKastState)
  fields = ['forward_mask', 'forward_change']
  fields += ['backward_mask', 'entered_from_c', 'penalty'] if topkast else []
  named = jax.tree_util.tree_flatten_with_path(state.forward_mask, is_leaf=is_masked)[0]
  columns = [jax.tree_util.tree_leaves(getattr(state, f), is_leaf=is_masked) for f in fields]
  out, totals = {}, dict.fromkeys(('forward', 'change', 'backward', 'entered', 'penalty'), 0.0)
  size = 0
  for (path, a), *values in zip(named, *columns[1:]):
    if is_masked(a):
      continue
    n = a.size
    counts = {'forward': jnp.sum(a, dtype=jnp.float32), 'change': values[0]}
    if topkast:
      counts['backward'] = jnp.sum(values[1], dtype=jnp.float32)
      counts['entered'] = jnp.sum(values[2], dtype=jnp.float32)
      counts['penalty'] = values[3]
    if per_leaf:
      leaf = {k: v if k in ('change', 'penalty') else v / n for k, v in counts.items()}
      out.update({f'{path_name(path)}/{_NAMES[k]}': v for k, v in leaf.items()})
    totals['change'] += counts['change'] * counts['forward']
    for k in ('forward', 'backward', 'entered', 'penalty'):
      totals[k] += counts.get(k, 0.0)
    size += n
  out['forward_density'] = jnp.asarray(totals['forward'] / max(size, 1), jnp.float32)
  out['forward_change'] = jnp.asarray(
    totals['change'] / jnp.maximum(totals['forward'], 1.0), jnp.float32
  )
  if topkast:
    out['backward_density'] = jnp.asarray(totals['backward'] / max(size, 1), jnp.float32)
    out['entered_from_c'] = jnp.asarray(totals['entered'] / max(size, 1), jnp.float32)
    out['penalty'] = jnp.asarray(totals['penalty'], jnp.float32)
  out['sparse_weights'] = jnp.asarray(size, jnp.int32)
  return out


_NAMES = dict(
  forward='forward_density',
  change='forward_change',
  backward='backward_density',
  entered='entered_from_c',
  penalty='penalty',
)
