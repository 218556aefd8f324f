"""The one engine every sparse method runs on; a method is a small `Policy` over it.

The engine owns what all methods share: the masks in the optimizer state (bits), the
gradient restricted to B (plus an optional exploration penalty), the wrapped optimizer (on the
dense leaves, or with ``compact_inner_state`` on the vectors of B's weights), the update masked
with B, when masks change (under a ``lax.cond`` unless every update), what happens to the
optimizer state of a weight whose mask changed, and the mask-change tracking behind the
metrics. A policy says how masks start, how they change and when.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from topkast_jax import automatic_sharding, bitmask, compact, regularizer
from topkast_jax.sparsity import is_dense, path_name
from topkast_jax.states import SparseState, matched_masks

# init(leaf_id, param, spec) -> (A, B), bool masks shaped like param.
InitMasks = Callable
# update(leaf_id, count, params_after, grad, A, B, spec) -> (A, B): the masks after update
# ``count`` (counted from 1); ``grad`` is the one passed to ``tx.update`` (at the sparse point).
UpdateMasks = Callable


class Policy(NamedTuple):
  """How one sparse method's masks start and change."""

  init: InitMasks
  update: UpdateMasks | None  # None: masks never change
  due: Callable[[jax.Array], jax.Array] | None = None  # count -> bool; None: every update
  exploration_l2: float | jax.Array = 0.0  # Top-KAST's penalty (`topkast_jax.regularizer`)
  zero_entering: bool = False  # a weight entering B lands on exactly zero, with zero state
  # True: init returns (A, B, thresholds) and update takes the last thresholds as a last
  # argument and returns (A, B, thresholds), kept in the state between mask changes (Top-KAST:
  # its searches start there, `topk.refreshed_masks`).
  thresholds: bool = False


def _per_leaf(fn, params, specs, *trees):
  """``fn(leaf_id, param, spec, *leaves)`` at sparse leaves (leaf_id: the index in
  ``tree_leaves(params)``, which seeds random masks), ``MaskedNode()`` at dense ones."""
  ids = jax.tree.unflatten(jax.tree.structure(params), range(len(jax.tree.leaves(params))))
  return jax.tree.map(
    lambda i, p, s, *xs: optax.MaskedNode() if is_dense(s) else fn(i, p, s, *xs),
    ids,
    params,
    specs,
    *trees,
  )


def _split(params, tuples, n=2):
  """``n`` trees from a tree of n-tuples (``MaskedNode()`` at dense leaves stays in each)."""
  pick = lambda j: lambda _, r: r if is_dense(r) else r[j]  # noqa: E731
  return tuple(jax.tree.map(pick(j), params, tuples) for j in range(n))


def _packed(masks):
  return jax.tree.map(bitmask.pack, masks)


def _unpacked(masks):
  return jax.tree.map(bitmask.unpack, masks)


def _where_not_dense(fn, params, *masks):
  """``fn(param, *masks)`` at sparse leaves; params unchanged at dense ones."""
  return jax.tree.map(lambda p, m, *r: p if is_dense(m) else fn(p, m, *r), params, *masks)


def _once_gradients_exist(count, fn, grads, *operands):
  """``fn(grads, *operands)``, scheduled after every gradient exists.

  Left to itself, XLA's scheduler starts work that needs only the params and the state (the
  compact path's B index from its bits and its gathers at B) before the forward pass and keeps
  the results alive through the activations' peak. ``lax.optimization_barrier`` does not order
  the schedule (XLA removes it before scheduling); a conditional cannot start before all its
  operands exist. So ``fn`` runs as a conditional on a predicate XLA cannot fold
  (``count >= 0``: always true; ``fn`` is traced once). ResNet-50 at 0.9 / 0.8, compact: the
  step's peak 1586.5 -> 1312.2 MiB. (Under ``vmap`` over the state, both branches run.)

  Only around work whose results are exact copies (indices, gathers, zeros): an optimizer's
  arithmetic inside a branch would no longer fuse with the caller's ``apply_updates``, which
  rounds differently (1 ulp) from the inner optimizer alone.
  """
  return jax.lax.cond(count >= 0, fn, fn, grads, *operands)


def _one_leaf_at_a_time(count):
  """A function ``call(fn, *arrays) -> fn(*arrays)``, for one sparse leaf's mask change at a
  time: each call a conditional that waits for the last call's result.

  Left to itself, XLA's scheduler computes every leaf's keys (magnitudes, random bits, the
  candidates' ranks) before the first leaf's selection, so all of them are alive at once:
  the Transformer-XL's SET step peaked at 2.0x dense's. A conditional cannot start before its
  operands exist, and its temporaries live only inside it; the predicate, always true, reads
  the last call's mask (whether any entry is set: a slice of a sharded mask would not do), so
  XLA can neither fold it nor reorder the calls. The masks are integer work, bit-identical
  either way. Transformer-XL (4 layers of the enwik8 config), SET: step peak 1691.3 ->
  1103.1 MiB; dense 848.6.
  """
  token = [count]

  def call(fn, *arrays):
    out = jax.lax.cond(token[0] >= 0, fn, fn, *arrays)
    token[0] = count + jnp.any(jax.tree.leaves(out)[0]).astype(count.dtype)
    return out

  return call


def _index(backward_bits, specs):
  """B's sorted indices per sparse leaf (`compact.index_of`), from the stored masks."""
  return jax.tree.map(
    lambda b, s: b if is_dense(s) else compact.index_of(b, s.total_counts(bitmask.shape(b))[1]),
    backward_bits,
    specs,
    is_leaf=is_dense,
  )


def _check_gradients(grads, params) -> None:
  """Raises ValueError, naming the leaf, unless ``grads`` has the paths and shapes of ``params``."""
  found = {path_name(p): jnp.shape(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  wanted = {path_name(p): jnp.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  if found.keys() != wanted.keys():
    missing, extra = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
    raise ValueError(
      f'the gradient tree does not match the params: missing {missing[:5]}, unexpected '
      f'{extra[:5]}. Pass the gradient of the loss with respect to sparse_params(params, state).'
    )
  for name, shape in wanted.items():
    if found[name] != shape:
      raise ValueError(
        f'the gradient at {name!r} has shape {found[name]}, the parameter has shape {shape}.'
      )


def _check_state_fits(state, inner, inner_params) -> None:
  """Raises ValueError unless the wrapped optimizer's state has the shapes ``inner.init`` gives
  here (a compact state's vectors have B's size, so a state made with another sparsity fails).
  """
  expected = jax.eval_shape(inner.init, inner_params)
  # Shapes in leaf order: containers may differ (Flax NNX wraps the state's arrays).
  if [jnp.shape(x) for x in jax.tree.leaves(state.inner_state)] != [
    x.shape for x in jax.tree.leaves(expected)
  ]:
    raise ValueError(
      'the wrapped optimizer state does not have the shapes these settings need (was it made '
      'with another sparsity, method or compact_inner_state?). Re-run tx.init(params).'
    )


def sparse_training(
  inner: optax.GradientTransformation | None,
  policy: Policy,
  leaf_specs: Callable,
  *,
  reset_inner_state_on_exit: bool = False,
  compact_inner_state: bool = False,
  track_mask_changes: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """A sparse method around ``inner`` (None: Top-KAST's link form, see `topkast`).

  ``leaf_specs(params)`` gives the spec tree (`topkast_jax.resolve_sparsities`);
  ``reset_inner_state_on_exit``, ``compact_inner_state`` and ``track_mask_changes`` as for
  `topkast`. Weights outside B never move (in the wrapped form); masks change after the update,
  from the params after it.
  """
  for name, value in [('reset_inner_state_on_exit', reset_inner_state_on_exit),
                      ('compact_inner_state', compact_inner_state),
                      ('track_mask_changes', track_mask_changes)]:  # fmt: skip
    if not isinstance(value, bool):
      raise ValueError(f'{name} must be True or False, got {value!r}.')
  wrapped = inner is not None
  inner = optax.with_extra_args_support(inner if wrapped else optax.identity())

  def tracked(old_a, new_a, new_b, seen, entered):
    change = _where_not_dense(
      lambda n, o: bitmask.count(n & ~o) / jnp.maximum(bitmask.count(n), 1).astype(jnp.float32),
      new_a,
      old_a,
    )
    entered = jax.tree.map(lambda e, c, a: e | (c & a), entered, seen, new_a)
    seen = jax.tree.map(lambda c, b: c | ~b, seen, new_b)
    return seen, entered, change

  def init_fn(params):
    mesh = automatic_sharding.automatic_mesh(params)
    if mesh is None:
      return init_state(params)
    # On a mesh of automatic axes XLA would choose the state's layout and replicate the wrapped
    # optimizer's moments (every device holding all of them): init as under explicit axes, so
    # they, the masks and B's vectors are sharded like their params.
    return automatic_sharding.with_explicit_axes(init_state, mesh, (params,))

  @jax.jit  # one compiled program, not hundreds of small ones op by op (5.7 s -> 1.6 s, TXL)
  def init_state(params):
    specs = leaf_specs(params)
    forward, backward, *thresholds = _split(
      params, _per_leaf(policy.init, params, specs), 3 if policy.thresholds else 2
    )
    inner_params = (
      compact.gather(params, _index(_packed(backward), specs)) if compact_inner_state else params
    )
    return SparseState(
      count=jnp.zeros((), jnp.int32),
      forward_mask=_packed(forward),
      backward_mask=_packed(backward),
      ever_in_c=jax.tree.map(jnp.logical_not, backward) if track_mask_changes else None,
      entered_from_c=jax.tree.map(jnp.zeros_like, forward) if track_mask_changes else None,
      forward_change=(
        jax.tree.map(lambda _: jnp.zeros((), jnp.float32), forward) if track_mask_changes else None
      ),
      thresholds=thresholds[0] if thresholds else None,
      inner_state=inner.init(inner_params),
    )

  def update_fn(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        'this method needs the current params: call tx.update(grads, state, params).'
      )
    specs = leaf_specs(params)
    forward_bits, backward_bits = matched_masks(params, state, specs)
    _check_gradients(grads, params)
    forward, backward = _unpacked(forward_bits), _unpacked(backward_bits)
    if compact_inner_state:  # the wrapped optimizer sees the vector of B's weights per leaf

      def at_b(grads, params, forward_bits, backward_bits):
        index = _index(backward_bits, specs)
        gathered = compact.gather(params, index), compact.gather(grads, index)
        base = compact.zeros(index, params)  # where the updates are scattered
        return index, *gathered, compact.gather_masks(forward_bits, index), base

      index, inner_params, grads_at_b, forward_at_b, base = _once_gradients_exist(
        state.count, at_b, grads, params, forward_bits, backward_bits
      )
      _check_state_fits(state, inner, inner_params)
      # Every gathered weight is in B; kept as data (i >= 0), not a constant True, so that XLA
      # compiles the penalty gradient's arithmetic as on the dense path (bit-identical).
      in_b = jax.tree.map(lambda i: i if is_dense(i) else i >= 0, index, is_leaf=is_dense)
      restricted = regularizer.restrict_and_regularise(
        grads_at_b,
        inner_params,
        forward_at_b,
        in_b,
        specs,
        policy.exploration_l2,
      )
      updates, inner_state = inner.update(restricted, state.inner_state, inner_params, **extra_args)
      updates = compact.scatter(updates, index, base)
    else:
      restricted = regularizer.restrict_and_regularise(
        grads, params, forward, backward, specs, policy.exploration_l2
      )
      _check_state_fits(state, inner, params)
      updates, inner_state = inner.update(restricted, state.inner_state, params, **extra_args)
      if wrapped:
        updates = _where_not_dense(
          lambda u, b: jnp.where(b, u, jnp.zeros_like(u)), updates, backward
        )
    count = optax.safe_int32_increment(state.count)

    # The wrapped form takes masks from the params after this update; the link form cannot.
    # Computed outside the conditional: inside one jitted step XLA then shares this sum with
    # the caller's apply_updates, instead of materialising the updates as a cond operand.
    after = optax.apply_updates(params, updates) if wrapped else params

    def change():
      last = (state.thresholds,) if policy.thresholds else ()
      # Under the due conditional only: around every step's refresh the conditionals cost
      # collectives on an automatic mesh (benchmarks/sharded_collectives.py, FSDP: all-reduces
      # 28 -> 58) for 0.4% of Top-KAST's peak (the Transformer-XL of 4 layers).
      in_turn = (
        _one_leaf_at_a_time(count) if policy.due is not None else lambda fn, *arrays: fn(*arrays)
      )

      def leaf_change(i, param, spec, *arrays):  # arrays: grad, A's and B's bits[, thresholds]
        def masks(p, g, a, b, *t):
          return policy.update(i, count, p, g, bitmask.unpack(a), bitmask.unpack(b), spec, *t)

        return in_turn(masks, param, *arrays)

      new = _per_leaf(
        leaf_change,
        after,
        specs,
        grads,
        forward_bits,
        backward_bits,
        *last,
      )
      new_a, new_b, *thresholds = _split(params, new, 3 if policy.thresholds else 2)
      tracking = state.ever_in_c, state.entered_from_c, state.forward_change
      if track_mask_changes:
        tracking = tracked(forward, new_a, new_b, state.ever_in_c, state.entered_from_c)
      return new_a, new_b, (*tracking, thresholds[0] if thresholds else None)

    kept = state.ever_in_c, state.entered_from_c, state.forward_change, state.thresholds
    if policy.update is None:  # masks never change (static)
      new_bits, new_b, tracking = (forward_bits, backward_bits), backward, kept
    elif policy.due is None:
      new_a, new_b, tracking = change()
      new_bits = _packed(new_a), _packed(new_b)
    else:
      keep = (forward_bits, backward_bits), kept
      new_bits, tracking = jax.lax.cond(
        policy.due(count),
        lambda: (lambda a, b, t: ((_packed(a), _packed(b)), t))(*change()),
        lambda: keep,
      )
      new_b = _unpacked(new_bits[1])

    if policy.update is not None:  # the state of weights whose mask changed
      if compact_inner_state:
        inner_state = compact.move_state(
          inner, inner_state, new_bits[1], index, _one_leaf_at_a_time(count)
        )
      elif reset_inner_state_on_exit or policy.zero_entering:
        reset = _where_not_dense(
          lambda new, old: new & ~old if policy.zero_entering else old & ~new, new_b, backward
        )
        inner_state = optax.tree_utils.tree_map_params(
          inner,
          lambda s, r: jnp.where(r, jnp.zeros_like(s), s),
          inner_state,
          jax.tree.map(
            lambda r: jnp.zeros((), bool) if is_dense(r) else r, reset, is_leaf=is_dense
          ),
          transform_non_params=lambda s: s,
        )
      if policy.zero_entering:  # weights entering B land on zero: p + (-p) == 0 exactly
        entering = _where_not_dense(lambda new, old: new & ~old, new_b, backward)
        updates = _where_not_dense(lambda u, e, p: jnp.where(e, -p, u), updates, entering, params)
    seen, entered, changed, thresholds = tracking
    return updates, SparseState(count, *new_bits, seen, entered, changed, thresholds, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
