"""The training method of an experiment, chosen once from ``config.method``."""

from typing import NamedTuple

import jax
import optax

import topkast_jax

METHODS = ('dense', 'topkast')


class Method(NamedTuple):
  tx: optax.GradientTransformation  # the whole optimizer, method included
  sparse: bool  # the network runs on topkast_jax.sparse_params(params, opt_state)


def _inner(config, schedule):
  o = config.optimizer
  if o.name == 'sgd':
    return optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov)
  return optax.adam(schedule, b1=o.b1, b2=o.b2)


def _topkast_args(config) -> dict:
  s = config.sparsity
  return dict(
    forward_sparsity=s.forward,
    backward_sparsity=s.backward,
    update_every=s.update_every,
    exploration_l2=s.exploration_l2,
    distribution=s.distribution,
  )


def check(config) -> None:
  """Raises ValueError, naming ``config.sparsity``, for invalid method hyper-parameters."""
  if config.method == 'topkast':
    try:
      topkast_jax.topkast(None, **_topkast_args(config))
    except ValueError as e:
      raise ValueError(f'config.sparsity: {e}') from e


def build(config, schedule, params, sparsity_overrides=None) -> Method:
  """The optimizer for ``config.method`` ('dense' or 'topkast'), and whether it is sparse.

  Weight decay (``config.optimizer.weight_decay``, coupled like the paper's L2 term) applies to
  kernels (ndim >= 2). Under Top-KAST the sparse kernels get the exploration penalty
  (``config.sparsity.exploration_l2``) instead, and weight decay only reaches the kernels that
  stay dense. Gradient clipping (``config.optimizer.clip_norm`` > 0) comes first.
  """
  s, sparse = config.sparsity, config.method == 'topkast'
  specs = [None] * len(jax.tree.leaves(params))
  if sparse:
    specs = topkast_jax.resolve_sparsities(
      params, s.forward, s.backward, sparsity_overrides, s.distribution
    )
  decay_mask = jax.tree.unflatten(
    jax.tree.structure(params),
    [x.ndim >= 2 and spec is None for x, spec in zip(jax.tree.leaves(params), specs)],
  )
  tx = _inner(config, schedule)
  if config.optimizer.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(config.optimizer.weight_decay, decay_mask), tx)
  if sparse:
    tx = topkast_jax.topkast(tx, **_topkast_args(config), sparsity=sparsity_overrides)
  if config.optimizer.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.optimizer.clip_norm), tx)
  return Method(tx, sparse)
