"""Every method by name, with one set of keyword hyper-parameters: what the experiment driver
and the study build their optimizers with."""

import optax

from topkast_jax.baselines import magnitude_pruning, rigl, set_sparse, static_sparse, ste
from topkast_jax.sparsity import SparsitySpec
from topkast_jax.structure import Structure
from topkast_jax.transform import topkast

METHODS = ('dense', 'topkast', 'ste', 'static', 'set', 'rigl', 'magnitude_pruning')


def by_name(
  method: str,
  inner: optax.GradientTransformation,
  *,
  forward_sparsity: float,
  backward_sparsity: float | None = None,
  update_every: int = 1,
  exploration_l2: float = 0.0,
  mask_update_every: int = 100,
  drop_fraction: float | optax.Schedule = 0.3,
  begin_step: int = 0,
  end_step: int | None = None,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  structure: Structure = None,
  seed: int = 0,
  track_mask_changes: bool = False,
) -> optax.GradientTransformation:
  """``inner`` trained by ``method``, one of `METHODS` ('dense' gives ``inner`` back).

  Each method takes the arguments it has: Top-KAST ``backward_sparsity`` (default: the
  forward one), ``update_every`` and ``exploration_l2``; SET, RigL and magnitude pruning
  ``mask_update_every`` and ``end_step`` (required for them), SET and RigL ``drop_fraction``,
  magnitude pruning ``begin_step``; static, SET and RigL ``seed``. The rest as for `topkast`.
  """
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; use one of {", ".join(METHODS)}.')
  if method == 'dense':
    return inner
  common = dict(
    sparsity=sparsity,
    distribution=distribution,
    structure=structure,
    track_mask_changes=track_mask_changes,
  )
  if method == 'topkast':
    return topkast(
      inner,
      forward_sparsity=forward_sparsity,
      backward_sparsity=forward_sparsity if backward_sparsity is None else backward_sparsity,
      update_every=update_every,
      exploration_l2=exploration_l2,
      **common,
    )
  common['sparsity_level'] = forward_sparsity
  if method == 'ste':
    return ste(inner, **common)
  if method == 'static':
    return static_sparse(inner, seed=seed, **common)
  if end_step is None:
    raise ValueError(f'{method} needs end_step: its last mask update (or, pruning, its target).')
  common.update(end_step=end_step, update_every=mask_update_every)
  if method == 'magnitude_pruning':
    return magnitude_pruning(inner, begin_step=begin_step, **common)
  grow = rigl if method == 'rigl' else set_sparse
  return grow(inner, drop_fraction=drop_fraction, seed=seed, **common)
