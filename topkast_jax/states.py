"""The optimizer states of the sparse methods, and the sparse view of params they give.

Every method keeps its forward mask in its state as ``forward_mask`` (bool, like each sparse
leaf; ``optax.MaskedNode()`` at dense leaves). `sparse_params` reads it from whichever state
an optimizer holds, so one train step serves Top-KAST and every baseline.
"""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from topkast_jax import bitmask
from topkast_jax.sparsity import path_name


class TopKastState(NamedTuple):
  """State of `topkast`. Per-leaf fields hold ``optax.MaskedNode()`` at dense leaves."""

  count: chex.Array  # int32 scalar: updates since init
  # A and B at the last refresh (A within B), per sparse leaf as bits (`topkast_jax.bitmask`:
  # uint8, 8 weights per byte along the last axis; bool if that axis is not a multiple of 8).
  forward_mask: optax.Params
  backward_mask: optax.Params
  # With track_mask_changes (else None): bools like each sparse leaf, in C at some refresh
  # (init included), and in A at a refresh after one in C; a float32 scalar per sparse leaf,
  # the share of A new at the last refresh.
  ever_in_c: optax.Params | None
  entered_from_c: optax.Params | None
  forward_change: optax.Params | None
  penalty: optax.Params  # float32 scalar per sparse leaf: exploration penalty at the last update
  inner_state: optax.OptState  # the wrapped optimizer's state (EmptyState without one)


class MaskState(NamedTuple):
  """State of the baselines (static, SET, RigL, magnitude pruning): one mask per sparse leaf."""

  count: chex.Array  # int32 scalar: updates since init
  forward_mask: optax.Params  # bool, like each sparse leaf: the weights in use
  forward_change: (
    optax.Params
  )  # float32 scalar per sparse leaf: share of the mask new at last update
  inner_state: optax.OptState  # the wrapped optimizer's state


SparseState = TopKastState | MaskState


def is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def unpack_masks(masks):
  """A tree of masks (a state's ``forward_mask`` or ``backward_mask``) as bool arrays.

  Top-KAST stores masks as bits (`topkast_jax.bitmask`); the baselines' masks are bool already.
  """
  return jax.tree.map(bitmask.unpack, masks)


def check_state_matches(params, state: SparseState, specs=None) -> list:
  """The forward mask (bool, or ``MaskedNode``) of each leaf of ``params``; raises ValueError unless
  ``params`` is the tree (and, given ``specs``, the sparsity layout) ``state`` was made for.

  Leaves are matched by path, not by tree structure, so params and state may wrap their leaves
  in different containers (Flax NNX: ``Param`` in the model, ``OptVariable`` in the optimizer).
  """
  leaves_with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [path_name(p) for p, _ in leaves_with_paths]
  masks = jax.tree_util.tree_flatten_with_path(state.forward_mask, is_leaf=is_masked)[0]
  if names != [path_name(p) for p, _ in masks]:
    shown = ', '.join(names[:8]) + (', ...' if len(names) > 8 else '')
    raise ValueError(
      'params do not have the structure of the params the optimizer was initialised with '
      f'(params: {shown}). Re-run tx.init(params) after changing the model.'
    )
  mask_leaves = [m for _, m in masks]
  specs = specs if specs is not None else [not is_masked(m) for m in mask_leaves]
  for name, (_, leaf), mask, spec in zip(names, leaves_with_paths, mask_leaves, specs):
    expected = None if spec is None or spec is False else tuple(jnp.shape(leaf))
    got = None if is_masked(mask) else bitmask.shape(mask)
    if expected != got:
      raise ValueError(
        f'params do not match the optimizer state at {name!r}: the state holds '
        f'{"no mask" if got is None else f"a mask of shape {got}"}, the params need '
        f'{"none (dense)" if expected is None else f"one of shape {expected}"}. Re-run '
        'tx.init(params) after changing the model or the sparsity settings.'
      )
  return [m if is_masked(m) else bitmask.unpack(m) for m in mask_leaves]


def find_sparse_state(opt_state) -> SparseState:
  """The single sparse-method state anywhere inside an optax state (chain, MultiSteps, ...)."""
  kinds = (TopKastState, MaskState)
  found = [
    s
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
    if isinstance(s, kinds)
  ]
  if len(found) != 1:
    raise ValueError(
      f'expected exactly one sparse-training state inside the optimizer state, found '
      f'{len(found)}. Pass the state of an optimizer built with one topkast_jax method '
      '(topkast, ste, static_sparse, set_sparse, rigl or magnitude_pruning), used once.'
    )
  return found[0]


def sparse_params(params, opt_state) -> Any:
  """The forward-pass parameters: each sparse leaf zero outside its mask; dense leaves unchanged.

  Works with the state of every method in this package. Differentiate the loss with respect
  to the result and pass that gradient to ``tx.update``.
  """
  masks = check_state_matches(params, find_sparse_state(opt_state))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  return treedef.unflatten(
    [p if is_masked(a) else jnp.where(a, p, jnp.zeros_like(p)) for p, a in zip(leaves, masks)]
  )


def sparse_value_and_grad(loss_fn, has_aux: bool = False):
  """``jax.value_and_grad`` of ``loss_fn`` at the sparse point, in one call.

  ``loss_fn(params, *args)`` is any loss of a parameter pytree. The result is
  ``f(params, opt_state, *args) -> (value, grads)``: the loss evaluated on
  ``sparse_params(params, opt_state)`` and its gradient there, which is what ``tx.update``
  expects. Differentiating at the dense ``params`` instead (a forgotten ``sparse_params``)
  silently trains a dense forward pass; this makes the right path the short one.
  """
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def at_sparse_point(params, opt_state, *args, **kwargs):
    return value_and_grad(sparse_params(params, opt_state), *args, **kwargs)

  return at_sparse_point
