"""compact_inner_state: the wrapped optimizer's state for B only, equal to the dense-state path
with reset_inner_state_on_exit, under jit, pmap and a checkpoint round trip."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from test_transform import batches, init_params, make_step, mlp_loss, sparse_params

from topkast_jax import (
  bitmask,
  compact,
  magnitude_pruning,
  rigl,
  set_sparse,
  static_sparse,
  topkast,
  unpack_masks,
)

DIMS = dict(d_in=12, d_hidden=16, d_out=8)  # 16 and 8: packed masks on both kernels
L2 = 1e-3
KERNELS = ('hidden', 'out')
OPTIMIZERS = {
  'sgd': lambda: optax.sgd(0.1),
  'momentum': lambda: optax.sgd(0.1, momentum=0.9),
  'nesterov': lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
  'adam': lambda: optax.adam(0.05),
}


def make_pair(optimizer, every):
  kwargs = dict(forward_sparsity=0.7, backward_sparsity=0.4, update_every=every, exploration_l2=L2)
  reset = topkast(optimizer, reset_inner_state_on_exit=True, **kwargs)
  return reset, topkast(optimizer, compact_inner_state=True, **kwargs)


def b_slots(state):
  """B's slots per sparse leaf as compact_inner_state lays them out (from B's bits)."""
  return jax.tree.map(lambda b: compact.index_of(b, int(bitmask.count(b))), state.backward_mask)


def dense_inner_state(tx_inner, state, params):
  """The compact state's inner state scattered to leaf shapes (zeros outside B)."""

  def scatter(s, index, p):
    if isinstance(index, optax.MaskedNode) or jnp.ndim(s) != 1:
      return s
    return jnp.zeros(p.size, s.dtype).at[index].set(s, mode='drop').reshape(p.shape)

  return optax.tree_utils.tree_map_params(
    tx_inner, scatter, state.inner_state, b_slots(state), params
  )


@pytest.mark.parametrize(
  'name, every',
  [(name, 1) for name in OPTIMIZERS] + [('adam', 3)],  # 3: between refreshes too
)
def test_compact_equals_reset_on_exit_bit_for_bit(name, every):
  params = init_params(**DIMS)
  reset, compact = make_pair(OPTIMIZERS[name](), every)
  p_reset, s_reset = params, reset.init(params)
  p_compact, s_compact = params, compact.init(params)
  reset_step, compact_step = jax.jit(make_step(reset)), jax.jit(make_step(compact))
  moved = 0
  for batch in batches(3, 12, d_in=12, d_out=8):
    old_b = unpack_masks(s_compact.backward_mask)['hidden']['kernel']
    p_reset, s_reset = reset_step(p_reset, s_reset, batch)
    p_compact, s_compact = compact_step(p_compact, s_compact, batch)
    chex.assert_trees_all_equal(p_compact, p_reset)  # bit for bit
    chex.assert_trees_all_equal(s_compact.forward_mask, s_reset.forward_mask)
    chex.assert_trees_all_equal(s_compact.backward_mask, s_reset.backward_mask)
    chex.assert_trees_all_equal(
      dense_inner_state(OPTIMIZERS[name](), s_compact, params), s_reset.inner_state
    )
    moved += int(np.sum(old_b != unpack_masks(s_compact.backward_mask)['hidden']['kernel']))
  assert moved > 0, 'the test needs B to change'
  for kernel in KERNELS:  # B's sorted flat indices agree with the mask
    b = np.asarray(unpack_masks(s_compact.backward_mask)[kernel]['kernel']).ravel()
    np.testing.assert_array_equal(b_slots(s_compact)[kernel]['kernel'], np.flatnonzero(b))


def test_compact_updates_of_another_dtype_than_the_gradients():
  """bfloat16 weights, Adam's first moment in float32: float32 updates (scattered into the
  bfloat16 zeros made before the update, cast), still equal to the dense-state path."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(**DIMS))
  reset, compact = make_pair(optax.adam(0.05, mu_dtype=jnp.float32), 1)
  p_reset, s_reset = params, reset.init(params)
  p_compact, s_compact = params, compact.init(params)
  compact_update, reset_step = jax.jit(compact.update), jax.jit(make_step(reset))
  for batch in batches(3, 4, d_in=12, d_out=8):
    grads = jax.grad(mlp_loss)(sparse_params(p_compact, s_compact), batch)
    updates, s_compact = compact_update(grads, s_compact, p_compact)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
    p_compact = optax.apply_updates(p_compact, updates)
    p_reset, s_reset = reset_step(p_reset, s_reset, batch)
    chex.assert_trees_all_equal(p_compact, p_reset)
    chex.assert_trees_all_equal(s_compact.backward_mask, s_reset.backward_mask)


BASELINES = {
  'static': lambda **kw: static_sparse(optax.adam(0.05), sparsity_level=0.7, **kw),
  'set': lambda **kw: set_sparse(
    optax.adam(0.05), sparsity_level=0.7, end_step=12, update_every=2, drop_fraction=0.5, **kw
  ),
  'rigl': lambda **kw: rigl(
    optax.adam(0.05), sparsity_level=0.7, end_step=12, update_every=2, drop_fraction=0.5, **kw
  ),
}


@pytest.mark.parametrize('method', list(BASELINES))
def test_baseline_compact_equals_dense_state_bit_for_bit(method):
  """Static, SET and RigL with compact_inner_state train exactly as with the dense state (a
  grown weight starts from zero state either way), whose state equals it on the mask."""
  params = init_params(**DIMS)
  dense, small = BASELINES[method](), BASELINES[method](compact_inner_state=True)
  p_dense, s_dense = params, dense.init(params)
  p_small, s_small = params, small.init(params)
  dense_step, small_step = jax.jit(make_step(dense)), jax.jit(make_step(small))
  on_mask = lambda s, b: s if isinstance(b, optax.MaskedNode) else jnp.where(b, s, 0)  # noqa: E731
  for batch in batches(3, 12, d_in=12, d_out=8):
    p_dense, s_dense = dense_step(p_dense, s_dense, batch)
    p_small, s_small = small_step(p_small, s_small, batch)
    chex.assert_trees_all_equal(p_small, p_dense)
    chex.assert_trees_all_equal(s_small.backward_mask, s_dense.backward_mask)
    masks = unpack_masks(s_dense.backward_mask)
    chex.assert_trees_all_equal(
      dense_inner_state(optax.adam(0.05), s_small, params),
      optax.tree_utils.tree_map_params(optax.adam(0.05), on_mask, s_dense.inner_state, masks),
    )
  size = s_small.inner_state[0].mu['hidden']['kernel'].shape[0]
  assert size == compact.length(round(0.3 * 12 * 16))  # |A| weights, padded


def test_magnitude_pruning_has_no_compact_state():
  with pytest.raises(TypeError, match='compact_inner_state'):
    magnitude_pruning(optax.sgd(0.1), sparsity_level=0.7, end_step=4, compact_inner_state=True)


@pytest.mark.parametrize(
  'shape', [(64,), (12, 16), (16, 8), (3, 8, 40), (7, 5), (2, 9, 3), (5, 96), (2, 3, 64)]
)
def test_slots_from_masks_as_stored_match_numpy(shape):
  """B's indices and the old slots of new indices, from packed bits (last axis a multiple of 8)
  and from bool masks, against numpy."""
  rng = np.random.default_rng(sum(shape))
  old, new = (rng.random(shape) < p for p in (0.3, 0.25))
  stored = jax.jit(bitmask.pack)(jnp.asarray(old))
  assert stored.dtype == (jnp.uint8 if shape[-1] % 8 == 0 else jnp.bool_)
  index = np.asarray(jax.jit(compact.index_of, static_argnums=1)(stored, int(old.sum())))
  want = np.flatnonzero(old)
  np.testing.assert_array_equal(index[: len(want)], want)
  np.testing.assert_array_equal(index[len(want) :], old.size)  # padding: past the leaf
  new_index = np.asarray(compact.index_of(jnp.asarray(new), int(new.sum())))
  slots = np.asarray(jax.jit(compact.slots_of)(stored, jnp.asarray(new_index)))
  rank = np.cumsum(old.ravel()) - 1
  padded = np.append(old.ravel(), False)  # the padding index reads as outside B
  expected = np.where(padded[new_index], np.append(rank, -1)[new_index], -1)
  np.testing.assert_array_equal(slots, expected)


def test_padded_slots_read_zero_and_are_never_written():
  """|B| = 915 takes 920 slots (a multiple of 8): the padding holds the index past the leaf,
  its state stays zero, and training equals the dense-state path with reset, bit for bit."""
  params = {'w': jax.random.normal(jax.random.key(1), (61, 50))}
  kwargs = dict(forward_sparsity=0.9, backward_sparsity=0.7, exploration_l2=1e-3)
  reset = topkast(optax.adam(0.05), reset_inner_state_on_exit=True, **kwargs)
  compact = topkast(optax.adam(0.05), compact_inner_state=True, **kwargs)
  p_reset, s_reset, p_compact, s_compact = params, reset.init(params), params, compact.init(params)

  def loss(p, x):
    return jnp.sum(jnp.tanh(x @ p['w']) ** 2)

  reset_step, compact_step = jax.jit(make_step(reset, loss)), jax.jit(make_step(compact, loss))
  for x in jax.random.normal(jax.random.key(2), (6, 3, 61)):
    p_reset, s_reset = reset_step(p_reset, s_reset, x)
    p_compact, s_compact = compact_step(p_compact, s_compact, x)
    chex.assert_trees_all_equal(p_compact, p_reset)
    index = np.asarray(b_slots(s_compact)['w'])
    assert index.shape == (920,)
    b = np.asarray(unpack_masks(s_compact.backward_mask)['w']).ravel()
    np.testing.assert_array_equal(index[:915], np.flatnonzero(b))
    np.testing.assert_array_equal(index[915:], 61 * 50)
    mu = np.asarray(s_compact.inner_state[0].mu['w'])
    np.testing.assert_array_equal(mu[915:], 0.0)
    assert np.count_nonzero(mu[:915]) > 800  # zero only for weights new in B


def test_compact_state_holds_b_only():
  params = init_params(**DIMS)
  _, compact = make_pair(optax.adam(0.05), 1)
  state = compact.init(params)
  adam = state.inner_state[0]
  for kernel in KERNELS:
    n = params[kernel]['kernel'].size
    size_b = round(0.6 * n)  # under 128: no padding
    assert adam.mu[kernel]['kernel'].shape == adam.nu[kernel]['kernel'].shape == (size_b,)
    assert adam.mu[kernel]['bias'].shape == params[kernel]['bias'].shape  # dense leaves as is
    assert state.forward_mask[kernel]['kernel'].nbytes * 8 == n  # one bit per weight
  shapes = jax.eval_shape(compact.init, params)  # nothing allocated
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, state)


def test_compact_under_pmap_equals_jit():
  n_dev = jax.local_device_count()
  _, tx = make_pair(optax.adam(0.05), 1)
  params = init_params(**DIMS)
  state = tx.init(params)

  def pmapped(params, opt_state, batch):
    grads = jax.grad(mlp_loss)(sparse_params(params, opt_state), batch)
    updates, opt_state = tx.update(jax.lax.pmean(grads, 'batch'), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  p_step, j_step = jax.pmap(pmapped, axis_name='batch'), jax.jit(make_step(tx))
  rp, rs = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_dev, *jnp.shape(x))), (params, state))
  jp, js = params, state
  for x, y in batches(4, 4, n=32, d_in=12, d_out=8):
    split = (x.reshape(n_dev, -1, 12), y.reshape(n_dev, -1, 8))
    rp, rs = p_step(rp, rs, split)
    jp, js = j_step(jp, js, (x, y))
  first = jax.tree.map(lambda x: x[0], (rp, rs))
  chex.assert_trees_all_close(first[0], jp, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(first[1].backward_mask, js.backward_mask)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[-1], rs), first[1])  # replicas agree


def test_compact_state_checkpoints_and_resumes_exactly(tmp_path):
  _, tx = make_pair(optax.sgd(0.1, momentum=0.9), 1)
  params = init_params(**DIMS)
  state = tx.init(params)
  step = jax.jit(make_step(tx))
  data = batches(5, 6, d_in=12, d_out=8)
  for batch in data[:3]:
    params, state = step(params, state, batch)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'ckpt', (params, state))
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / 'ckpt', jax.eval_shape(lambda: (params, state)))
  chex.assert_trees_all_equal(restored, (params, state))
  rp, rs = restored
  for batch in data[3:]:
    params, state = step(params, state, batch)
    rp, rs = step(rp, rs, batch)
  chex.assert_trees_all_equal((rp, rs), (params, state))


def test_compact_needs_a_wrapped_optimizer():
  with pytest.raises(ValueError, match='compact_inner_state=True needs a wrapped optimizer'):
    topkast(forward_sparsity=0.9, backward_sparsity=0.8, compact_inner_state=True)
