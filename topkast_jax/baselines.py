"""The methods Top-KAST is compared with, as optax transformations shaped like `topkast`.

* `static_sparse`: a random mask at init, never changed.
* `set_sparse` (Mocanu et al. 2018) and `rigl` (Evci et al. 2020): every ``update_every``
  updates until ``end_step``, drop the smallest-magnitude share of each mask and grow as many
  weights, at random (SET) or by the largest |gradient| (RigL).
* `magnitude_pruning` (Zhu and Gupta 2017): dense at start, pruned by magnitude to a cubic
  sparsity schedule.
* `ste`: top-k forward, straight-through gradient to every weight: a Top-KAST preset.

They run on the one engine of `topkast_jax.engine` with B = A: the wrapped optimizer sees the
gradient on the mask only and its updates are masked, so weights outside the mask never move;
a method only says how its masks start and change. Masks hold exact counts per layer
(`topkast_jax.topk`, ties to the lowest index). A grown weight starts at exactly zero with
zeroed optimizer state. Updates are counted from 1; an update's mask change uses the params
after that update. ``compact_inner_state`` (as for `topkast`) is offered where the number of
trained weights is fixed: static, SET and RigL. Every method takes ``structure`` (N:M or
blocks, `topkast_jax.structure`): SET and RigL then regrow inside each group what it lost, or
whole blocks; magnitude pruning follows its schedule over n (the weights a group keeps) or
over blocks.
"""

import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from topkast_jax import automatic_sharding, engine
from topkast_jax.sparsity import SparsitySpec, check_step_count, is_dense, resolve_sparsities
from topkast_jax.structure import NM, Blocks, Structure
from topkast_jax.topk import magnitude_keys, top_keys_mask
from topkast_jax.transform import topkast

# update_mask(leaf_id, count, params_after, grad, mask, spec) -> new mask
MaskUpdate = Callable[[int, jax.Array, jax.Array, jax.Array, jax.Array, object], jax.Array]


def _check_common(method, inner, sparsity_level, distribution, seed) -> None:
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(
      f'{method} wraps an optimizer, e.g. {method}(optax.sgd(0.1), sparsity_level=0.9, ...); '
      f'got inner={inner!r}.'
    )
  if isinstance(sparsity_level, bool) or not isinstance(sparsity_level, (int, float, np.number)):
    raise ValueError(f'sparsity_level must be a Python float, got {sparsity_level!r}.')
  if not 0.0 <= sparsity_level < 1.0:
    raise ValueError(f'sparsity_level must be in [0, 1), got {sparsity_level}.')
  if distribution not in ('uniform', 'erk'):
    raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}.")
  check_step_count('seed', seed, 0)


def _among(mask: jax.Array, keys: jax.Array) -> jax.Array:
  """Keys: one more than ``keys`` inside ``mask`` (saturating), 0 outside it."""
  top = jnp.asarray(np.iinfo(keys.dtype).max >> 1, keys.dtype)
  return jnp.where(mask, jnp.minimum(keys, top - 1) + 1, jnp.zeros_like(keys))


def _random_keys(key: jax.Array, like: jax.Array) -> jax.Array:
  """Random 31-bit keys shaped (and sharded) like ``like``."""
  spec = automatic_sharding.out_spec(like)
  return jax.random.bits(key, like.shape, jnp.uint32, out_sharding=spec) >> 1


def _top(keys, k, spec, method='auto'):
  """The ``k`` largest ``keys`` of each layer of a leaf (of its blocks, for block keys)."""
  return top_keys_mask(keys, k, layer_axes=spec.layer_axes, method=method)


def _units(spec, shape):
  """What a leaf's masks choose from: ``(to_units, from_units, count)``: a function from an
  array shaped like the leaf to one per unit (the blocks' scores; weights themselves
  otherwise), its inverse for masks, and the forward count of units per layer."""
  if isinstance(spec.structure, Blocks):
    blocks = spec.structure
    return blocks.scores, blocks.expand, spec.block_counts(shape)[0]
  return (lambda x: x), (lambda m: m), spec.layer_counts(shape)[0]


def _masked(
  inner: optax.GradientTransformation,
  *,
  sparsity_level: float,
  sparsity: SparsitySpec,
  distribution: str,
  seed: int,
  structure: Structure = None,
  compact_inner_state: bool = False,
  track_mask_changes: bool = False,
  dense_at_init: bool = False,
  update_mask: MaskUpdate | None = None,
  due: Callable[[jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """A baseline's policy: masks at init (random, or all ones), and at each ``due(count)``
  update the masks from ``update_mask``, grown weights set to zero with zeroed state."""
  root = jax.random.key(seed)

  def leaf_specs(params):
    specs = resolve_sparsities(
      params, sparsity_level, sparsity_level, sparsity, distribution, structure
    )
    for spec in jax.tree.leaves(specs, is_leaf=is_dense):
      if not is_dense(spec) and spec.backward != spec.forward:
        raise ValueError(
          f'a (forward, backward) pair in `sparsity` is for topkast; the baselines take one '
          f'sparsity per leaf, got {(spec.forward, spec.backward)}.'
        )
    return specs

  def init(i, leaf, spec):
    if dense_at_init:
      mask = jnp.ones_like(leaf, bool)
    else:
      key = jax.random.fold_in(root, i)
      if isinstance(spec.structure, NM):
        mask = spec.structure.rank(_random_keys(key, leaf)) < spec.group_counts()[0]
      else:
        to_units, from_units, count = _units(spec, leaf.shape)
        # Once per run: the bisection compiles in about 0.6x the radix select's time (topk).
        mask = from_units(_top(_random_keys(key, to_units(leaf)), count, spec, 'bisection'))
    return mask, mask

  def update(i, count, after, grad, a, b, spec):
    mask = update_mask(i, count, after, grad, a, spec)
    return mask, mask

  policy = engine.Policy(init=init, update=update_mask and update, due=due, zero_entering=True)
  return engine.sparse_training(
    inner,
    policy,
    leaf_specs,
    compact_inner_state=compact_inner_state,
    track_mask_changes=track_mask_changes,
  )


def static_sparse(
  inner: optax.GradientTransformation,
  *,
  sparsity_level: float,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  structure: Structure = None,
  seed: int = 0,
  compact_inner_state: bool = False,
  track_mask_changes: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """A random mask per sparse leaf (exactly round((1 - s) n) weights per layer, seeded), never
  changed.

  The network runs on ``sparse_params(params, state)``: zero outside the mask from step 0;
  those weights never move. ``sparsity``, ``distribution``, ``structure`` (a random n of each
  group, or random blocks), ``compact_inner_state`` and ``track_mask_changes`` as for
  `topkast`.
  """
  _check_common('static_sparse', inner, sparsity_level, distribution, seed)
  return _masked(
    inner,
    sparsity_level=sparsity_level,
    sparsity=sparsity,
    distribution=distribution,
    structure=structure,
    seed=seed,
    compact_inner_state=compact_inner_state,
    track_mask_changes=track_mask_changes,
  )


def _drop_fraction_schedule(drop_fraction, end_step) -> optax.Schedule:
  if callable(drop_fraction):
    return drop_fraction
  if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float, np.number)):
    raise ValueError(f'drop_fraction must be a float or a schedule, got {drop_fraction!r}.')
  if not 0.0 <= drop_fraction <= 1.0:
    raise ValueError(f'drop_fraction must be in [0, 1], got {drop_fraction}.')
  return optax.cosine_decay_schedule(float(drop_fraction), end_step)


def _drop_and_grow(
  method, grow_keys, inner, *, sparsity_level, update_every, drop_fraction, end_step, sparsity,
  distribution, seed, **options,
):  # fmt: skip
  _check_common(method, inner, sparsity_level, distribution, seed)
  check_step_count('update_every', update_every, 1)
  check_step_count('end_step', end_step, 1)
  fraction = _drop_fraction_schedule(drop_fraction, end_step)
  if update_every > end_step:
    warnings.warn(
      f'{method}: update_every={update_every} > end_step={end_step}, so the mask never '
      f'changes: this trains a static mask. Lower update_every or raise end_step.',
      UserWarning,
      stacklevel=3,
    )
  root = jax.random.key(seed)

  def update_mask(i, count, weights, grad, mask, spec):
    to_units, from_units, active = _units(spec, mask.shape)
    blocks = isinstance(spec.structure, Blocks)
    units = spec.structure.of_mask(mask) if blocks else mask
    f = jnp.clip(jnp.asarray(fraction(count), jnp.float32), 0.0, 1.0)
    n_drop = jnp.floor(f * active + 0.5).astype(jnp.int32)
    kept = _top(_among(units, magnitude_keys(to_units(weights))), active - n_drop, spec)
    key = jax.random.fold_in(jax.random.fold_in(root, count), i)
    grow = _among(~kept, grow_keys(key, to_units(grad)))
    if isinstance(spec.structure, NM):  # each group regrows what it lost, inside the group
      nm = spec.structure
      return kept | (nm.rank(grow) < spec.group_counts()[0] - nm.group_count(kept))
    return from_units(kept | _top(grow, n_drop, spec))

  return _masked(
    inner,
    sparsity_level=sparsity_level,
    sparsity=sparsity,
    distribution=distribution,
    seed=seed,
    update_mask=update_mask,
    **options,
    due=lambda count: (count % update_every == 0) & (count <= end_step),
  )


def set_sparse(
  inner: optax.GradientTransformation,
  *,
  sparsity_level: float,
  end_step: int,
  update_every: int = 100,
  drop_fraction: float | optax.Schedule = 0.3,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  structure: Structure = None,
  seed: int = 0,
  compact_inner_state: bool = False,
  track_mask_changes: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """SET (Mocanu et al. 2018): prune by magnitude, regrow at random, at constant sparsity.

  Starts from a random mask (as `static_sparse`). At every ``update_every``-th update up to
  ``end_step``: of each leaf's ``|A|`` active weights drop the ``round(f |A|)`` smallest in
  magnitude (after this update), then grow as many, chosen uniformly at random among the
  weights not kept (a just-dropped weight may come back, as in RigL's Algorithm 1). A float
  ``drop_fraction`` decays to 0 at ``end_step`` by a cosine (RigL's default); a callable is
  used as is, ``f = drop_fraction(count)``. Per layer of a stacked leaf; the other
  arguments as for `static_sparse`.
  """
  return _drop_and_grow('set_sparse', _random_keys, **locals())


def rigl(
  inner: optax.GradientTransformation,
  *,
  sparsity_level: float,
  end_step: int,
  update_every: int = 100,
  drop_fraction: float | optax.Schedule = 0.3,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  structure: Structure = None,
  seed: int = 0,
  compact_inner_state: bool = False,
  track_mask_changes: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """RigL (Evci et al. 2020): as `set_sparse`, but grow the weights with the largest ``|gradient|``.

  The gradient is the one passed to ``update``, taken with respect to ``sparse_params``: it
  is dense, so the train step needs nothing extra. Ties go to the lowest flat index.
  """
  return _drop_and_grow('rigl', lambda key, grad: magnitude_keys(grad), **locals())


def magnitude_pruning(
  inner: optax.GradientTransformation,
  *,
  sparsity_level: float,
  end_step: int,
  begin_step: int = 0,
  update_every: int = 100,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  structure: Structure = None,
  track_mask_changes: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning (Zhu and Gupta 2017): dense at start, sparse at ``end_step``.

  A leaf of target sparsity ``s`` is pruned, at every ``update_every``-th update from
  ``begin_step`` and at ``end_step``, to sparsity
  ``s_t = s (1 - (1 - (t - begin_step) / (end_step - begin_step))^3)`` (``round((1 - s_t) n)``
  weights, in float32; exactly the target count from ``end_step`` on), keeping the largest
  magnitudes among the weights still in use. Pruned weights never return. Per layer of a
  stacked leaf. No ``compact_inner_state``: the run starts dense, so a compact state would be
  as large as the dense one when memory is first needed.
  """
  _check_common('magnitude_pruning', inner, sparsity_level, distribution, 0)
  check_step_count('update_every', update_every, 1)
  check_step_count('begin_step', begin_step, 0)
  check_step_count('end_step', end_step, max(begin_step, 1))  # updates count from 1

  def update_mask(i, count, weights, grad, mask, spec):
    nm = spec.structure if isinstance(spec.structure, NM) else None
    to_units, from_units, final_count = _units(spec, mask.shape)
    if nm:  # a schedule over n: the weights kept per group
      size, final_count = nm.m, spec.group_counts()[0]
    elif isinstance(spec.structure, Blocks):
      size = spec.structure.count(spec.layer_shape(mask.shape))
      mask = spec.structure.of_mask(mask)
    else:
      size = math.prod(spec.layer_shape(mask.shape))
    span = max(end_step - begin_step, 1)
    progress = jnp.clip((count - begin_step) / span, 0.0, 1.0).astype(jnp.float32)
    density = 1.0 - (1.0 - final_count / size) * (1.0 - (1.0 - progress) ** 3)
    k = jnp.floor(density * size + 0.5).astype(jnp.int32)
    k = jnp.where(count >= end_step, final_count, k)
    keys = _among(mask, magnitude_keys(to_units(weights)))
    return nm.rank(keys) < k if nm else from_units(_top(keys, k, spec))

  def due(count):
    on_grid = (count - begin_step) % update_every == 0
    return (count >= begin_step) & (count <= end_step) & (on_grid | (count == end_step))

  return _masked(
    inner,
    sparsity_level=sparsity_level,
    sparsity=sparsity,
    distribution=distribution,
    structure=structure,
    seed=0,
    dense_at_init=True,
    update_mask=update_mask,
    due=due,
    track_mask_changes=track_mask_changes,
  )


def ste(
  inner: optax.GradientTransformation | None = None,
  *,
  sparsity_level: float,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  structure: Structure = None,
  track_mask_changes: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Straight-through magnitude pruning: the forward pass uses the top-k of ``|theta|``, taken
  every step, and the gradient reaches every weight. Exactly `topkast` with
  ``backward_sparsity=0, update_every=1, exploration_l2=0``."""
  return topkast(
    inner,
    forward_sparsity=sparsity_level,
    backward_sparsity=0.0,
    update_every=1,
    exploration_l2=0.0,
    sparsity=sparsity,
    distribution=distribution,
    structure=structure,
    track_mask_changes=track_mask_changes,
  )
