"""Top-KAST as an optax gradient transformation.

Jayakumar et al., "Top-KAST: Top-K Always Sparse Training", NeurIPS 2020 (arXiv 2106.03517).
Per sparse leaf theta: A = top-D of |theta| (the forward set), B = top-(D+M) (A within B).
The network runs on alpha = theta on A, 0 elsewhere (`sparse_params`); the gradient with
respect to alpha, plus the exploration penalty, is applied to theta on B only.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from topkast_jax import bitmask, compact, regularizer
from topkast_jax.sparsity import (
  LeafSparsity,
  SparsitySpec,
  check_sparsities,
  check_step_count,
  resolve_sparsities,
)
from topkast_jax.states import TopKastState, check_state_matches, is_masked, unpack_masks
from topkast_jax.topk import topk_masks


def _check_static(update_every, exploration_l2):
  check_step_count('update_every', update_every, 1)
  if isinstance(exploration_l2, bool) or not isinstance(
    exploration_l2, (int, float, np.number, jax.Array, np.ndarray)
  ):
    raise ValueError(f'exploration_l2 must be a number or a scalar array, got {exploration_l2!r}.')
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


def _masks_for(leaf, spec: LeafSparsity | None):
  if spec is None:
    return optax.MaskedNode(), optax.MaskedNode()
  return topk_masks(leaf, spec.counts(leaf.size))


def _packed(masks):
  return jax.tree.map(bitmask.pack, masks)


def topkast(
  inner: optax.GradientTransformation | None = None,
  *,
  forward_sparsity: float,
  backward_sparsity: float,
  update_every: int = 1,
  exploration_l2: float | jax.Array = 0.0,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
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
    reset_inner_state_on_exit: zero the wrapped optimizer's per-parameter state (momentum,
      moments) of a weight when it leaves B at a refresh. Default: keep it.
    compact_inner_state: keep the wrapped optimizer's state for the weights in B only, so it
      shrinks with the backward density: the optimizer sees each sparse leaf as the vector of
      its |B| weights (flat index order), state moves with weights that stay in B and starts
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
    An ``optax.GradientTransformationExtraArgs``; its state is a `TopKastState`.
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
  wrapped = inner is not None
  inner = optax.with_extra_args_support(inner if wrapped else optax.identity())

  def leaf_specs(params):
    return resolve_sparsities(params, forward_sparsity, backward_sparsity, sparsity, distribution)

  def refresh(params):
    """(A, B, |A|) per leaf, A and B as bool; ``optax.MaskedNode()`` at dense leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = leaf_specs(params)
    pairs = [_masks_for(x, s) for x, s in zip(leaves, specs)]
    sizes = [s.counts(x.size)[0] if s else optax.MaskedNode() for x, s in zip(leaves, specs)]
    unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
    return unflatten([p[0] for p in pairs]), unflatten([p[1] for p in pairs]), unflatten(sizes)

  def slots(backward, params):
    """B's (index, place) trees (`compact.slots`) from bool masks; MaskedNode at dense leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    pairs = zip(leaves, treedef.flatten_up_to(backward), leaf_specs(params))
    found = [(b, b) if s is None else compact.slots(b, s.counts(x.size)[1]) for x, b, s in pairs]
    return treedef.unflatten([f[0] for f in found]), treedef.unflatten([f[1] for f in found])

  def init_fn(params):
    forward, backward, _ = refresh(params)
    zeros_scalar = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), forward)
    inner_params = (
      compact.gather(params, slots(backward, params)[0]) if compact_inner_state else params
    )
    return TopKastState(
      count=jnp.zeros((), jnp.int32),
      forward_mask=_packed(forward),
      backward_mask=_packed(backward),
      ever_in_c=jax.tree.map(jnp.logical_not, backward) if track_mask_changes else None,
      entered_from_c=jax.tree.map(jnp.zeros_like, forward) if track_mask_changes else None,
      forward_change=zeros_scalar if track_mask_changes else None,
      penalty=zeros_scalar,
      inner_state=inner.init(inner_params),
    )

  def refreshed_state(state, params_after, inner_state, old_place):
    forward, backward, forward_sizes = refresh(params_after)
    changed, seen, entered = state.forward_change, state.ever_in_c, state.entered_from_c
    if track_mask_changes:
      changed = jax.tree.map(  # share of A new since the last refresh
        lambda old, new, size: jnp.sum(new & ~old, dtype=jnp.int32) / jnp.float32(max(size, 1)),
        unpack_masks(state.forward_mask),
        forward,
        forward_sizes,
      )
      entered = jax.tree.map(lambda e, c, a: e | (c & a), entered, seen, forward)
      seen = jax.tree.map(lambda c, b: c | ~b, seen, backward)
    if compact_inner_state:
      new_index, _ = slots(backward, params_after)
      inner_state = compact.move_state(inner, inner_state, old_place, new_index)
    elif reset_inner_state_on_exit:
      left_b = jax.tree.map(
        lambda p, old, new: jnp.zeros((), bool) if is_masked(old) else old & ~new,
        params_after,
        unpack_masks(state.backward_mask),
        backward,
      )
      inner_state = optax.tree_utils.tree_map_params(
        inner,
        lambda s, left: jnp.where(left, jnp.zeros_like(s), s),
        inner_state,
        left_b,
        transform_non_params=lambda s: s,
      )
    return _packed(forward), _packed(backward), seen, entered, changed, inner_state

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('topkast needs the current params: call tx.update(grads, state, params).')
    specs = leaf_specs(params)
    check_state_matches(params, state, specs)
    place = None
    if compact_inner_state:  # the wrapped optimizer sees the vector of B's weights per leaf
      index, place = slots(unpack_masks(state.backward_mask), params)
      inner_params = compact.gather(params, index)
      # Every gathered weight is in B; kept as data (i >= 0), not a constant True, so that XLA
      # compiles the penalty's arithmetic as on the dense path and the two stay bit-identical.
      in_b = jax.tree.map(lambda i: i if is_masked(i) else i >= 0, index, is_leaf=is_masked)
      grads, penalty = regularizer.restrict_and_regularise(
        compact.gather(updates, index),
        inner_params,
        compact.gather_masks(state.forward_mask, index),
        in_b,
        specs,
        exploration_l2,
      )
      new_updates, inner_state = inner.update(grads, state.inner_state, inner_params, **extra_args)
      new_updates = compact.scatter(new_updates, index, params)
    else:
      forward, backward = unpack_masks(state.forward_mask), unpack_masks(state.backward_mask)
      grads, penalty = regularizer.restrict_and_regularise(
        updates, params, forward, backward, specs, exploration_l2
      )
      new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
      if wrapped:
        new_updates = jax.tree.map(
          lambda u, b: u if is_masked(b) else jnp.where(b, u, jnp.zeros_like(u)),
          new_updates,
          backward,
        )
    count = optax.safe_int32_increment(state.count)

    # The wrapped form takes masks from the params after this update; the link form cannot.
    # Computed outside the conditional: inside one jitted step XLA then shares this sum with
    # the caller's apply_updates, instead of materialising the updates as a cond operand.
    after = optax.apply_updates(params, new_updates) if wrapped else params

    def refresh_now():
      return refreshed_state(state, after, inner_state, place)

    def keep():
      masks = (state.forward_mask, state.backward_mask, state.ever_in_c, state.entered_from_c)
      return (*masks, state.forward_change, inner_state)

    if update_every == 1:
      masks = refresh_now()
    elif reset_inner_state_on_exit or compact_inner_state:
      masks = jax.lax.cond(count % update_every == 0, refresh_now, keep)
    else:  # Leave the optimizer state out of the conditional: no copy of it per step.
      masks = jax.lax.cond(count % update_every == 0, lambda: refresh_now()[:5], lambda: keep()[:5])
      masks = (*masks, inner_state)
    forward, backward, seen, entered, changed, inner_state = masks
    return new_updates, TopKastState(
      count, forward, backward, seen, entered, changed, penalty, inner_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
