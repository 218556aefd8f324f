"""The optimizer of an experiment: the paper's recipe, dense or wrapped in Top-KAST."""

import jax
import optax

import topkast_jax


def _inner(config, schedule):
  o = config.optimizer
  if o.name == 'sgd':
    return optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov)
  if o.name == 'adam':
    return optax.adam(schedule, b1=o.get('b1', 0.9), b2=o.get('b2', 0.999))
  raise ValueError(f"optimizer.name must be 'sgd' or 'adam', got {o.name!r}.")


def make_optimizer(config, schedule, params, sparsity_overrides=None):
  """Builds the transformation for ``config.method`` ('dense' or 'topkast').

  Weight decay (``config.optimizer.weight_decay``, coupled like the paper's L2 term) applies to
  kernels (ndim >= 2). Under Top-KAST the sparse kernels get the exploration penalty
  (``config.sparsity.exploration_l2``) instead, and weight decay only reaches the kernels that
  stay dense. Gradient clipping (``config.optimizer.clip_norm``) comes first.
  """
  if config.method not in ('dense', 'topkast'):
    raise ValueError(f"method must be 'dense' or 'topkast', got {config.method!r}.")
  sparse_leaves = [False] * len(jax.tree.leaves(params))
  kwargs = {}
  if config.method == 'topkast':
    s = config.sparsity
    kwargs = dict(
      forward_sparsity=s.forward,
      backward_sparsity=s.backward,
      update_every=s.update_every,
      exploration_l2=s.exploration_l2,
      sparsity=sparsity_overrides,
      distribution=s.get('distribution', 'uniform'),
    )
    specs = topkast_jax.resolve_sparsities(
      params, s.forward, s.backward, sparsity_overrides, kwargs['distribution']
    )
    sparse_leaves = [spec is not None for spec in specs]
  treedef = jax.tree.structure(params)
  decay_mask = jax.tree.unflatten(
    treedef,
    [x.ndim >= 2 and not sparse for x, sparse in zip(jax.tree.leaves(params), sparse_leaves)],
  )

  inner = _inner(config, schedule)
  if config.optimizer.get('weight_decay', 0.0):
    inner = optax.chain(optax.add_decayed_weights(config.optimizer.weight_decay, decay_mask), inner)
  tx = topkast_jax.topkast(inner, **kwargs) if config.method == 'topkast' else inner
  if config.optimizer.get('clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(config.optimizer.clip_norm), tx)
  return tx
