"""The training method of an experiment, chosen once from ``config.method``.

Every method reads its hyper-parameters from ``config.sparsity``: ``forward`` (the target
forward sparsity) and ``distribution`` for all; ``backward``, ``update_every`` and
``exploration_l2`` for Top-KAST; ``structure`` (``'none'``, ``'n:m'`` or ``'RxC'``) for all; ``mask_update_every``, ``drop_fraction``, ``begin_fraction``
and ``end_fraction`` (shares of the run's steps) for the baselines.
"""

from typing import NamedTuple

import jax
import optax

import topkast_jax
from topkast_jax.methods import by_name
from topkast_jax.sparsity import is_dense
from topkast_jax.structure import parse


class Method(NamedTuple):
  tx: optax.GradientTransformation  # the whole optimizer, method included
  sparse: bool  # the network runs on topkast_jax.sparse_params(params, opt_state)


def _inner(config, schedule):
  o = config.optimizer
  if o.name == 'sgd':
    return optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov)
  return optax.adam(schedule, b1=o.b1, b2=o.b2)


def _step(fraction: float, total_steps: int, least: int) -> int:
  return max(least, round(fraction * total_steps))


def _wrap(config, inner, total_steps: int, overrides):
  """``inner`` wrapped by the sparse method of ``config`` (ValueError for bad settings)."""
  s = config.sparsity
  for field in ('drop_fraction', 'begin_fraction', 'end_fraction'):
    if not 0.0 <= s[field] <= 1.0:
      raise ValueError(f'{field} must be in [0, 1] (a share of the run), got {s[field]}.')
  every = s.mask_update_every
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ValueError(f'mask_update_every must be an int >= 1, got {every!r}.')
  end_step = _step(s.end_fraction, total_steps, 1)
  return by_name(
    config.method,
    inner,
    forward_sparsity=s.forward,
    backward_sparsity=s.backward,
    update_every=s.update_every,
    exploration_l2=s.exploration_l2,
    mask_update_every=every,
    drop_fraction=s.drop_fraction,
    begin_step=min(_step(s.begin_fraction, total_steps, 0), end_step),
    end_step=end_step,
    sparsity=overrides,
    distribution=s.distribution,
    structure=parse(s.structure),
    seed=config.seed,
    track_mask_changes=True,  # logged as sparsity/forward_change and sparsity/entered_from_c
  )


def check(config, total_steps: int = 1) -> None:
  """Raises ValueError, naming ``config.sparsity``, for invalid method hyper-parameters."""
  if config.method != 'dense':
    try:
      _wrap(config, optax.identity(), total_steps, None)
    except ValueError as e:
      raise ValueError(f'config.sparsity: {e}') from e


def build(config, schedule, params, total_steps: int, sparsity_overrides=None) -> Method:
  """The optimizer for ``config.method``, and whether it is sparse.

  Weight decay (``config.optimizer.weight_decay``, coupled like the paper's L2 term) applies to
  kernels (ndim >= 2). Under Top-KAST the sparse kernels get the exploration penalty
  (``config.sparsity.exploration_l2``) instead, and weight decay only reaches the kernels that
  stay dense. Gradient clipping (``config.optimizer.clip_norm`` > 0) comes first.
  """
  s, sparse = config.sparsity, config.method != 'dense'
  decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)
  if config.method == 'topkast':
    specs = topkast_jax.resolve_sparsities(
      params, s.forward, s.backward, sparsity_overrides, s.distribution, parse(s.structure)
    )
    decay_mask = jax.tree.map(lambda x, spec: x.ndim >= 2 and is_dense(spec), params, specs)
  tx = _inner(config, schedule)
  if config.optimizer.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(config.optimizer.weight_decay, decay_mask), tx)
  if sparse:
    tx = _wrap(config, tx, total_steps, sparsity_overrides)
  if config.optimizer.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.optimizer.clip_norm), tx)
  return Method(tx, sparse)
