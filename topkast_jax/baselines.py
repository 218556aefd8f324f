"""The methods Top-KAST is compared with, as optax transformations shaped like `topkast`.

* `static_sparse`: a random mask at init, never changed.
* `set_sparse` (Mocanu et al. 2018) and `rigl` (Evci et al. 2020): every ``update_every``
  updates until ``end_step``, drop the smallest-magnitude share of each mask and grow as many
  weights, at random (SET) or by the largest |gradient| (RigL).
* `magnitude_pruning` (Zhu and Gupta 2017): dense at start, pruned by magnitude to a cubic
  sparsity schedule.
* `ste`: top-k forward, straight-through gradient to every weight: a Top-KAST preset.

They share one machinery (`_masked`): the wrapped optimizer sees the gradient on the mask
only and its updates are masked, so weights outside the mask never move; a method only says
how its masks start and change. Masks hold exact counts (`topkast_jax.topk`, ties to the
lowest index). A grown weight starts at exactly zero with zeroed optimizer state. Updates are
counted from 1; an update's mask change uses the params after that update.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from topkast_jax.sparsity import SparsitySpec, check_step_count, resolve_sparsities
from topkast_jax.states import MaskState, check_state_matches, is_masked
from topkast_jax.topk import magnitude_keys, top_keys_mask
from topkast_jax.transform import topkast

# update_mask(leaf_index, count, params_after, grad, mask, kept_count) -> new mask
MaskUpdate = Callable[[int, jax.Array, jax.Array, jax.Array, jax.Array, int], jax.Array]


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
  """Flat keys: one more than ``keys`` inside ``mask`` (saturating), 0 outside it."""
  top = jnp.asarray(np.iinfo(keys.dtype).max >> 1, keys.dtype)
  return jnp.where(mask.reshape(-1), jnp.minimum(keys, top - 1) + 1, jnp.zeros_like(keys))


def _random_keys(key: jax.Array, n: int) -> jax.Array:
  return jax.random.bits(key, (n,), jnp.uint32) >> 1


def _masked(
  inner: optax.GradientTransformation,
  *,
  sparsity_level: float,
  sparsity: SparsitySpec,
  distribution: str,
  seed: int,
  dense_at_init: bool = False,
  update_mask: MaskUpdate | None = None,
  due: Callable[[jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The shared machinery: masks at init (random, or all ones), and at each ``due(count)``
  update the masks from ``update_mask``, grown weights set to zero with zeroed state."""
  inner = optax.with_extra_args_support(inner)
  root = jax.random.key(seed)

  def leaf_specs(params):
    specs = resolve_sparsities(params, sparsity_level, sparsity_level, sparsity, distribution)
    for spec in specs:
      if spec is not None and spec.backward != spec.forward:
        raise ValueError(
          f'a (forward, backward) pair in `sparsity` is for topkast; the baselines take one '
          f'sparsity per leaf, got {tuple(spec)}.'
        )
    return specs

  def init_fn(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    masks = []
    for i, (leaf, spec) in enumerate(zip(leaves, leaf_specs(params))):
      if spec is None:
        masks.append(optax.MaskedNode())
      elif dense_at_init:
        masks.append(jnp.ones(leaf.shape, bool))
      else:
        k = spec.counts(leaf.size)[0]
        keys = _random_keys(jax.random.fold_in(root, i), leaf.size)
        masks.append(top_keys_mask(keys, k).reshape(leaf.shape))
    masks = treedef.unflatten(masks)
    return MaskState(
      count=jnp.zeros((), jnp.int32),
      forward_mask=masks,
      forward_change=jax.tree.map(lambda _: jnp.zeros((), jnp.float32), masks),
      inner_state=inner.init(params),
    )

  def update_fn(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        'this method needs the current params: call tx.update(grads, state, params).'
      )
    specs = leaf_specs(params)
    masks = check_state_matches(params, state, specs)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    only_on = lambda xs, ms: [x if is_masked(m) else jnp.where(m, x, 0) for x, m in zip(xs, ms)]  # noqa: E731
    grad_leaves = jax.tree.leaves(grads)
    updates, inner_state = inner.update(
      treedef.unflatten(only_on(grad_leaves, masks)), state.inner_state, params, **extra_args
    )
    updates = only_on(jax.tree.leaves(updates), masks)
    count = optax.safe_int32_increment(state.count)
    if update_mask is None:
      return treedef.unflatten(updates), state._replace(count=count, inner_state=inner_state)

    def new_masks():
      new, change = [], []
      for i, (p, u, g, m, spec) in enumerate(zip(leaves, updates, grad_leaves, masks, specs)):
        if spec is None:
          new.append(m)
          change.append(optax.MaskedNode())
          continue
        n = update_mask(i, count, p + u, g, m, spec.counts(p.size)[0])
        entered = jnp.sum(n & ~m, dtype=jnp.float32)
        new.append(n)
        change.append(entered / jnp.maximum(jnp.sum(n, dtype=jnp.float32), 1.0))
      return new, change

    def keep():
      return masks, jax.tree.leaves(state.forward_change, is_leaf=is_masked)

    new, change = jax.lax.cond(due(count), new_masks, keep)
    grown = [jnp.zeros((), bool) if is_masked(m) else n & ~m for n, m in zip(new, masks)]
    # A grown weight lands on exactly zero: p + (-p) == 0.
    updates = [jnp.where(gr, -p, u) for p, u, gr in zip(leaves, updates, grown)]
    inner_state = optax.tree_utils.tree_map_params(
      inner,
      lambda s, gr: jnp.where(gr, jnp.zeros_like(s), s),
      inner_state,
      treedef.unflatten(grown),
      transform_non_params=lambda s: s,
    )
    return treedef.unflatten(updates), MaskState(
      count, treedef.unflatten(new), treedef.unflatten(change), inner_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def static_sparse(
  inner: optax.GradientTransformation,
  *,
  sparsity_level: float,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """A random mask per sparse leaf (exactly round((1 - s) n) weights, seeded), never changed.

  The network runs on ``sparse_params(params, state)``: zero outside the mask from step 0;
  those weights never move. ``sparsity`` and ``distribution`` as for `topkast`.
  """
  _check_common('static_sparse', inner, sparsity_level, distribution, seed)
  return _masked(
    inner, sparsity_level=sparsity_level, sparsity=sparsity, distribution=distribution, seed=seed
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
  distribution, seed,
):  # fmt: skip
  _check_common(method, inner, sparsity_level, distribution, seed)
  check_step_count('update_every', update_every, 1)
  check_step_count('end_step', end_step, 1)
  fraction = _drop_fraction_schedule(drop_fraction, end_step)
  root = jax.random.key(seed)

  def update_mask(i, count, weights, grad, mask, active):
    f = jnp.clip(jnp.asarray(fraction(count), jnp.float32), 0.0, 1.0)
    n_drop = jnp.floor(f * active + 0.5).astype(jnp.int32)
    kept = top_keys_mask(_among(mask, magnitude_keys(weights)), active - n_drop)
    key = jax.random.fold_in(jax.random.fold_in(root, count), i)
    grown = top_keys_mask(_among(~kept, grow_keys(key, grad)), n_drop)
    return (kept | grown).reshape(mask.shape)

  return _masked(
    inner,
    sparsity_level=sparsity_level,
    sparsity=sparsity,
    distribution=distribution,
    seed=seed,
    update_mask=update_mask,
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
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """SET (Mocanu et al. 2018): prune by magnitude, regrow at random, at constant sparsity.

  Starts from a random mask (as `static_sparse`). At every ``update_every``-th update up to
  ``end_step``: of each leaf's ``|A|`` active weights drop the ``round(f |A|)`` smallest in
  magnitude (after this update), then grow as many, chosen uniformly at random among the
  weights not kept (a just-dropped weight may come back, as in RigL's Algorithm 1). A float
  ``drop_fraction`` decays to 0 at ``end_step`` by a cosine (RigL's default); a callable is
  used as is, ``f = drop_fraction(count)``.
  """
  return _drop_and_grow(
    'set_sparse',
    lambda key, grad: _random_keys(key, grad.size),
    inner,
    sparsity_level=sparsity_level,
    update_every=update_every,
    drop_fraction=drop_fraction,
    end_step=end_step,
    sparsity=sparsity,
    distribution=distribution,
    seed=seed,
  )


def rigl(
  inner: optax.GradientTransformation,
  *,
  sparsity_level: float,
  end_step: int,
  update_every: int = 100,
  drop_fraction: float | optax.Schedule = 0.3,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """RigL (Evci et al. 2020): as `set_sparse`, but grow the weights with the largest |gradient|.

  The gradient is the one passed to ``update``, taken with respect to ``sparse_params``: it
  is dense, so the train step needs nothing extra. Ties go to the lowest flat index.
  """
  return _drop_and_grow(
    'rigl',
    lambda key, grad: magnitude_keys(grad),
    inner,
    sparsity_level=sparsity_level,
    update_every=update_every,
    drop_fraction=drop_fraction,
    end_step=end_step,
    sparsity=sparsity,
    distribution=distribution,
    seed=seed,
  )


def magnitude_pruning(
  inner: optax.GradientTransformation,
  *,
  sparsity_level: float,
  end_step: int,
  begin_step: int = 0,
  update_every: int = 100,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning (Zhu and Gupta 2017): dense at start, sparse at ``end_step``.

  A leaf of target sparsity ``s`` is pruned, at every ``update_every``-th update from
  ``begin_step`` and at ``end_step``, to sparsity
  ``s_t = s (1 - (1 - (t - begin_step) / (end_step - begin_step))^3)`` (``round((1 - s_t) n)``
  weights, in float32; exactly the target count from ``end_step`` on), keeping the largest
  magnitudes among the weights still in use. Pruned weights never return.
  """
  _check_common('magnitude_pruning', inner, sparsity_level, distribution, 0)
  check_step_count('update_every', update_every, 1)
  check_step_count('begin_step', begin_step, 0)
  check_step_count('end_step', end_step, begin_step)

  def update_mask(i, count, weights, grad, mask, final_count):
    span = max(end_step - begin_step, 1)
    progress = jnp.clip((count - begin_step) / span, 0.0, 1.0).astype(jnp.float32)
    density = 1.0 - (1.0 - final_count / mask.size) * (1.0 - (1.0 - progress) ** 3)
    k = jnp.floor(density * mask.size + 0.5).astype(jnp.int32)
    k = jnp.where(count >= end_step, final_count, k)
    return top_keys_mask(_among(mask, magnitude_keys(weights)), k).reshape(mask.shape)

  def due(count):
    on_grid = (count - begin_step) % update_every == 0
    return (count >= begin_step) & (count <= end_step) & (on_grid | (count == end_step))

  return _masked(
    inner,
    sparsity_level=sparsity_level,
    sparsity=sparsity,
    distribution=distribution,
    seed=0,
    dense_at_init=True,
    update_mask=update_mask,
    due=due,
  )


def ste(
  inner: optax.GradientTransformation | None = None,
  *,
  sparsity_level: float,
  sparsity: SparsitySpec = None,
  distribution: str = 'uniform',
) -> optax.GradientTransformationExtraArgs:
  """Straight-through magnitude pruning: the forward pass uses the top-k of |theta|, taken
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
  )
