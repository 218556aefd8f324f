"""Top-KAST as an optax gradient transformation.

Jayakumar et al., "Top-KAST: Top-K Always Sparse Training", NeurIPS 2020 (arXiv 2106.03517).
Per sparse leaf theta: A = top-D of |theta| (the forward set), B = top-(D+M) (A within B).
The network runs on alpha = theta on A, 0 elsewhere (`sparse_params`); the gradient with
respect to alpha, plus the exploration penalty, is applied to theta on B only.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from topkast_jax import engine
from topkast_jax.sparsity import (
  SparsitySpec,
  check_sparsities,
  check_step_count,
  resolve_sparsities,
)
from topkast_jax.structure import NM, Blocks, Structure
from topkast_jax.topk import magnitude_keys, refreshed_masks


def _check_static(update_every, exploration_l2):
  check_step_count('update_every', update_every, 1)
  if isinstance(exploration_l2, bool) or not isinstance(
    exploration_l2, (int, float, np.number, jax.Array, np.ndarray)
  ):
    raise ValueError(f'exploration_l2 must be a number or a scalar array, got {exploration_l2!r}.')
  if np.ndim(exploration_l2) != 0:
    raise ValueError(
      f'exploration_l2 must be a scalar (one lambda for every sparse leaf), got an array of '
      f'shape {np.shape(exploration_l2)}.'
    )
  if isinstance(exploration_l2, (int, float, np.number)) and not 0 <= exploration_l2 < np.inf:
    raise ValueError(f'exploration_l2 must be finite and >= 0, got {exploration_l2}.')


STALE_RATIO = 5.0  # |B| / |A| from which a refresh interval > 1 gets a warning


def warn_if_stale(forward_sparsity: float, backward_sparsity: float, update_every: int) -> None:
  """Warns for a refresh interval > 1 with B at least 5 times as wide as A.

  Between refreshes the weights in B \\ A get straight-through gradients against a fixed A,
  then a large share of A is replaced at once. Measured with ``experiments/study.py``
  (LeNet-300-100, Fashion-MNIST, 5 epochs, backward sparsity 0, no penalty): a refresh every 100
  steps ends at chance (10.00%) at forward sparsity 0.9 and 0.95; every step, 88.30 / 88.25.
  """
  ratio = (1.0 - backward_sparsity) / (1.0 - forward_sparsity)
  if update_every > 1 and ratio >= STALE_RATIO:
    warnings.warn(
      f'topkast: update_every={update_every} with B {ratio:g}x as wide as A (forward '
      f'sparsity {forward_sparsity:g}, backward {backward_sparsity:g}) can diverge: weights '
      'outside A drift with straight-through gradients between refreshes, then replace much '
      'of A at once (measured: chance accuracy at 0.9 / 0 with a refresh every 100 steps). '
      'Use update_every=1 (the paper and the default) or a backward sparsity closer to the '
      'forward one.',
      UserWarning,
      stacklevel=3,
    )


def _top_masks(x, spec, thresholds=None):
  """(A, B, thresholds) of one leaf: the top |A| and |B| of |x| in each of its layers (groups
  or blocks, for a structured leaf), searched from the last refresh's thresholds
  (`topk.refreshed_masks`)."""
  keys, structure = magnitude_keys(x), spec.structure
  if isinstance(structure, NM):  # a rank within each group: no search, nothing to keep
    rank = structure.rank(keys)
    unused = jnp.zeros((*x.shape[: spec.layer_axes], 2, 2), jnp.uint32)
    return (*(rank < n for n in spec.group_counts()), unused)
  if isinstance(structure, Blocks):
    keys, counts = magnitude_keys(structure.scores(x)), spec.block_counts(x.shape)
  else:
    counts = spec.layer_counts(x.shape)
  masks, thresholds = refreshed_masks(keys, counts, thresholds, layer_axes=spec.layer_axes)
  if isinstance(structure, Blocks):
    masks = tuple(structure.expand(m) for m in masks)
  return (*masks, thresholds)


def topkast(
  inner: optax.GradientTransformation | None = None,
  *,
  forward_sparsity: float,
  backward_sparsity: float,
  update_every: int = 1,
  exploration_l2: float | jax.Array = 0.0,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  structure: Structure = None,
  reset_inner_state_on_exit: bool = False,
  compact_inner_state: bool = False,
  track_mask_changes: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Top-KAST sparse training around (or, without ``inner``, before) an optimizer.

  ``update(grads, state, params)`` expects ``grads`` taken with respect to
  ``sparse_params(params, state)``. It restricts them to B, adds the exploration penalty's
  gradient (lambda * theta on A, lambda / D * theta on B \\ A; Jayakumar et al. 2020, sec. 2.2),
  runs ``inner`` and masks its updates with B, so weights outside B never move. Every
  ``update_every`` updates the masks are recomputed from the parameters after the update.

  Without ``inner`` the transformation is a link for ``optax.chain(topkast(...), optimizer)``:
  it restricts and regularises the gradient and tracks the masks, but cannot see the final
  update, so (1) a stateful optimizer after it may still move weights outside B (momentum of
  past gradients), and (2) masks are refreshed from the parameters passed to the refreshing
  update, i.e. one step before the wrapped form would take them.

  Args:
    inner: the wrapped optimizer, or None for the link form.
    forward_sparsity: share of each sparse leaf that is zero in the forward pass (S = 1 - D).
    backward_sparsity: share of each sparse leaf that gets no gradient (1 - D - M); at most
      ``forward_sparsity``. Equal to it gives B = A; 0 gives a straight-through gradient on
      every weight.
    update_every: refresh the masks every this many updates. Default 1, the paper's setting
      (a longer interval with a wide B can diverge: see `warn_if_stale`).
    exploration_l2: lambda of the exploration penalty; may be an array (inject_hyperparams).
    sparsity: which leaves are sparse and per-leaf overrides; see `topkast_jax.sparsity`.
    distribution: 'uniform' (the paper) or 'erk' allocation of the global density.
    structure: ``NM(n, m)`` or ``Blocks(rows, cols)`` (`topkast_jax.structure`) for every sparse
      leaf, or None (default): any entries. With N:M, A is the top n of each group of m and B
      the top round((1 - backward_sparsity) m); forward_sparsity must be 1 - n / m. With
      blocks, A and B are the top blocks by norm. Per leaf through ``sparsity``.
    reset_inner_state_on_exit: zero the wrapped optimizer's per-parameter state (momentum,
      moments) of a weight when it leaves B at a refresh. Default: keep it.
    compact_inner_state: keep the wrapped optimizer's state for the weights in B only, so it
      shrinks with the backward density: the optimizer sees each sparse leaf as the vector of
      its ``|B|`` weights (flat index order), state moves with weights that stay in B and starts
      at zero for new ones. Equal, bit for bit, to ``reset_inner_state_on_exit=True`` for
      elementwise optimizers (SGD, momentum, Adam, ...). An optimizer that reads a leaf's shape
      (factored moments, per-row norms, a weight-decay mask computed from ``ndim``) sees the
      vector instead: give such masks as trees. B's indices are recomputed from its bits at
      each update (a pass over each sparse leaf), not stored.
    track_mask_changes: keep the state's ``forward_change`` (share of A new at each refresh)
      and ``entered_from_c`` (weights in A at a refresh after one that had them in C, init
      included: those that ever moved from C into A, the paper's Fig. 3). They
      cost a few passes over the masks per refresh and two bools per weight, so they are off by
      default (the fields are then None).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is a `SparseState`.
  """
  check_sparsities(forward_sparsity, backward_sparsity)
  _check_static(update_every, exploration_l2)
  warn_if_stale(forward_sparsity, backward_sparsity, update_every)
  if distribution not in ('uniform', 'erk'):
    raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}.")
  for name, value in [('reset_inner_state_on_exit', reset_inner_state_on_exit),
                      ('compact_inner_state', compact_inner_state)]:  # fmt: skip
    if value and inner is None:
      raise ValueError(
        f'{name}=True needs a wrapped optimizer (inner); the link form holds no optimizer state.'
      )

  def leaf_specs(params):
    return resolve_sparsities(
      params, forward_sparsity, backward_sparsity, sparsity, distribution, structure
    )

  policy = engine.Policy(
    init=lambda i, x, spec: _top_masks(x, spec),
    update=lambda i, count, after, grad, a, b, spec, last: _top_masks(after, spec, last),
    due=None if update_every == 1 else lambda count: count % update_every == 0,
    exploration_l2=exploration_l2,
    thresholds=True,
  )
  return engine.sparse_training(
    inner,
    policy,
    leaf_specs,
    reset_inner_state_on_exit=reset_inner_state_on_exit,
    compact_inner_state=compact_inner_state,
    track_mask_changes=track_mask_changes,
  )
