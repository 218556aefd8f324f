"""The optimizer states of the sparse methods, and the sparse view of params they give.

Every method keeps its forward and backward masks in one state type, `SparseState` (bits,
like each sparse leaf; ``optax.MaskedNode()`` at dense leaves). `sparse_params` reads it from
whichever state an optimizer holds, so one train step serves Top-KAST and every baseline.
"""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name

from topkast_jax import bitmask
from topkast_jax.sparsity import is_dense as is_masked  # noqa: F401 (the name callers use)
from topkast_jax.sparsity import path_name


class SparseState(NamedTuple):
  """State of every sparse method (`topkast_jax.engine`). Per-leaf fields hold
  ``optax.MaskedNode()`` at dense leaves."""

  count: chex.Array  # int32 scalar: updates since init
  # A and B at the last mask change (A within B; B = A for the baselines), per sparse leaf as
  # bits (`topkast_jax.bitmask`: uint8, 8 weights per byte along the last axis; bool if that
  # axis is not a multiple of 8).
  forward_mask: optax.Params
  backward_mask: optax.Params
  # With track_mask_changes (else None): bools like each sparse leaf, in C at some mask change
  # (init included), and in A at a change after one in C; a float32 scalar per sparse leaf,
  # the share of A new at the last change.
  ever_in_c: optax.Params | None
  entered_from_c: optax.Params | None
  forward_change: optax.Params | None
  # Top-KAST (else None): uint32 per sparse leaf, [*layer axes, 2, 2]: A's and B's thresholds
  # found at the last mask change and the one before, where the next search starts (zeros for
  # an N:M leaf, whose selection is a rank inside each group).
  thresholds: optax.Params | None
  inner_state: optax.OptState  # the wrapped optimizer's state (EmptyState without one)


def unpack_masks(masks):
  """A tree of masks (a state's ``forward_mask`` or ``backward_mask``) as bool arrays."""
  return jax.tree.map(bitmask.unpack, masks)


def matched_masks(params, state: SparseState, specs=None):
  """``state``'s (forward, backward) masks, as stored (bits), laid out like ``params``
  (``optax.MaskedNode()`` at dense leaves); raises ValueError unless ``params`` is the tree (and,
  given ``specs``, the sparsity layout) ``state`` was made for.

  Leaves are matched by path, not by tree structure, so params and state may wrap their leaves
  in different containers (Flax NNX: ``Param`` in the model, ``OptVariable`` in the optimizer).
  """
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_name(p) for p, _ in leaves_with_paths]
  masks = jax.tree_util.tree_flatten_with_path(state.forward_mask, is_leaf=is_masked)[0]
  if names != [path_name(p) for p, _ in masks]:
    shown = ', '.join(names[:8]) + (', ...' if len(names) > 8 else '')
    raise ValueError(
      'params do not have the structure of the params the optimizer was initialised with '
      f'(params: {shown}). Re-run tx.init(params) after changing the model.'
    )
  forward = [m for _, m in masks]
  backward = jax.tree_util.tree_leaves(state.backward_mask, is_leaf=is_masked)
  if specs is None:
    sparse = [not is_masked(m) for m in forward]
  else:
    sparse = [not is_masked(s) for s in jax.tree_util.tree_leaves(specs, is_leaf=is_masked)]
  for name, (_, leaf), mask, is_sparse in zip(names, leaves_with_paths, forward, sparse):
    expected = tuple(jnp.shape(leaf)) if is_sparse else None
    got = None if is_masked(mask) else bitmask.shape(mask)
    if expected != got:
      raise ValueError(
        f'params do not match the optimizer state at {name!r}: the state holds '
        f'{"no mask" if got is None else f"a mask of shape {got}"}, the params need '
        f'{"none (dense)" if expected is None else f"one of shape {expected}"}. Re-run '
        'tx.init(params) after changing the model or the sparsity settings.'
      )
  return treedef.unflatten(forward), treedef.unflatten(backward)


def find_sparse_state(opt_state) -> SparseState:
  """The single sparse-method state anywhere inside an optax state (chain, MultiSteps, ...)."""
  is_state = lambda x: isinstance(x, SparseState)  # noqa: E731
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state) if is_state(s)]
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
  forward, _ = matched_masks(params, find_sparse_state(opt_state))
  return jax.tree.map(lambda p, a: p if is_masked(a) else _zero_outside(p, a), params, forward)


def _zero_outside(x, mask):
  """``x`` zero outside ``mask`` (as stored: packed or bool)."""
  return jnp.where(bitmask.unpack(mask), x, jnp.zeros_like(x))


@jax.custom_vjp
def _masked(x, mask):
  """`_zero_outside` whose gradient passes to ``x`` unchanged, so the gradient with respect
  to ``x`` is the one at the sparse point."""
  return _zero_outside(x, mask)


def _masked_fwd(x, mask):
  return _masked(x, mask), mask


def _masked_bwd(mask, g):
  return g, np.zeros(mask.shape, jax.dtypes.float0)  # a mask has no gradient


_masked.defvjp(_masked_fwd, _masked_bwd)
_ALPHA = 'topkast_jax_sparse_params'


def sparse_value_and_grad(loss_fn, has_aux: bool = False):
  """``jax.value_and_grad`` of ``loss_fn`` at the sparse point, in one call.

  ``loss_fn(params, *args)`` is any loss of a parameter pytree. The result is
  ``f(params, opt_state, *args) -> (value, grads)``: the loss evaluated on
  ``sparse_params(params, opt_state)`` and its gradient there, which is what ``tx.update``
  expects. Differentiating at the dense ``params`` instead (a forgotten ``sparse_params``)
  silently trains a dense forward pass; this makes the right path the short one.

  The loss runs under ``jax.checkpoint`` with a policy meant to recompute the sparse
  parameters in the backward pass; in jax 0.10 that policy saves every value, so they are kept
  from the forward pass (docs/guides/benchmarks.md, the step's peak memory). The gradient is
  the same computation as ``jax.value_and_grad(loss_fn)`` at ``sparse_params(params,
  opt_state)``; XLA may associate some sums differently (equal bit for bit on the benchmark
  MLP and ResNet, within 1e-7 relative on a Transformer-XL).
  """

  def at_sparse_point(params, opt_state, *args, **kwargs):
    forward, _ = matched_masks(params, find_sparse_state(opt_state))

    def loss_of_params(params):
      alpha = jax.tree.map(
        lambda p, a: p if is_masked(a) else checkpoint_name(_masked(p, a), _ALPHA),
        params,
        forward,
      )
      return loss_fn(alpha, *args, **kwargs)

    policy = jax.checkpoint_policies.save_anything_except_these_names(_ALPHA)
    return jax.value_and_grad(jax.checkpoint(loss_of_params, policy=policy), has_aux=has_aux)(
      params
    )

  return at_sparse_point
