"""Baselines (static, SET, RigL, magnitude pruning, STE) against numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_transform import batches, init_params, make_step, mlp_loss, reference_mask

import topkast_jax
from topkast_jax import (
  export,
  magnitude_pruning,
  rigl,
  set_sparse,
  sparse_params,
  static_sparse,
  ste,
  unpack_masks,
)

S = 0.75
KERNELS = ('hidden', 'out')
CONSTANT = {
  'static': lambda inner, update_every=None, **kw: static_sparse(
    inner, sparsity_level=S, track_mask_changes=True, **kw
  ),
  'set': lambda inner, **kw: set_sparse(
    inner, sparsity_level=S, end_step=100, track_mask_changes=True, **kw
  ),
  'rigl': lambda inner, **kw: rigl(
    inner, sparsity_level=S, end_step=100, track_mask_changes=True, **kw
  ),
}


def kernel_masks(state):
  return {k: np.asarray(unpack_masks(state.forward_mask)[k]['kernel']) for k in KERNELS}


def first_by_key(candidates, key, k):
  """Mask of the k candidates with the largest ``key`` (ties: lowest flat index)."""
  flat = np.flatnonzero(candidates.ravel())
  order = flat[np.lexsort((flat, -key.ravel()[flat]))]
  out = np.zeros(candidates.size, bool)
  out[order[:k]] = True
  return out.reshape(candidates.shape)


def one_update(tx, steps_before=0):
  """Params, state and gradient before update ``steps_before + 1``, and after it."""
  params, state = init_params(), None
  state = tx.init(params)
  step = jax.jit(make_step(tx))
  data = batches(1, steps_before + 1)
  for batch in data[:-1]:
    params, state = step(params, state, batch)
  grads = jax.grad(mlp_loss)(sparse_params(params, state), data[-1])
  updates, new_state = tx.update(grads, state, params)
  return params, state, grads, optax.apply_updates(params, updates), new_state


@pytest.mark.parametrize('method', ['set', 'rigl'])
def test_one_drop_and_grow_matches_numpy(method):
  lr, fraction = 0.1, 0.25
  tx = CONSTANT[method](optax.sgd(lr), update_every=3, drop_fraction=lambda count: fraction)
  params, state, grads, new_params, new_state = one_update(tx, steps_before=2)
  for name in KERNELS:
    mask = np.asarray(unpack_masks(state.forward_mask)[name]['kernel'])
    p, g = np.asarray(params[name]['kernel']), np.asarray(grads[name]['kernel'])
    after = p - lr * np.where(mask, g, 0)
    active = int(mask.sum())
    n_drop = int(np.floor(fraction * active + 0.5))
    kept = first_by_key(mask, np.abs(after), active - n_drop)
    new_mask = np.asarray(unpack_masks(new_state.forward_mask)[name]['kernel'])
    grown = new_mask & ~kept
    np.testing.assert_array_equal(new_mask & kept, kept)  # the drop is exactly numpy's
    assert grown.sum() == n_drop > 0 and new_mask.sum() == active
    if method == 'rigl':
      np.testing.assert_array_equal(grown, first_by_key(~kept, np.abs(g), n_drop))
    # Weights new to the mask start at zero; a dropped one grown back keeps its value (as
    # RigL's reference, reinit_when_same=False).
    new = new_mask & ~mask
    got = np.asarray(new_params[name]['kernel'])
    np.testing.assert_array_equal(got[new], 0.0)
    np.testing.assert_allclose(got[~new], after[~new], rtol=1e-6)
    change = float(new_state.forward_change[name]['kernel'])
    assert change == pytest.approx((new_mask & ~mask).sum() / active)


def test_set_grows_at_random_reproducibly_by_seed():
  grown = {}
  for seed in (0, 0, 1):
    tx = CONSTANT['set'](optax.sgd(0.1), update_every=1, drop_fraction=0.5, seed=seed)
    _, state, _, _, new_state = one_update(tx)
    before, after = kernel_masks(state)['hidden'], kernel_masks(new_state)['hidden']
    grown.setdefault(seed, []).append(after & ~before)
  np.testing.assert_array_equal(grown[0][0], grown[0][1])
  assert not np.array_equal(grown[0][0], grown[1][0])


@pytest.mark.parametrize('method', sorted(CONSTANT))
def test_constant_sparsity_exact_and_inactive_weights_never_move(method):
  tx = CONSTANT[method](optax.sgd(0.1, momentum=0.9), update_every=2)
  params = init_params()
  state = tx.init(params)
  first = kernel_masks(state)
  step = jax.jit(make_step(tx))
  for batch in batches(2, 12):
    before, masks_before = params, kernel_masks(state)
    params, state = step(params, state, batch)
    masks = kernel_masks(state)
    for name in KERNELS:
      size = params[name]['kernel'].size
      assert masks[name].sum() == round((1 - S) * size)
      idle = ~masks_before[name] & ~masks[name]
      np.testing.assert_array_equal(
        np.asarray(params[name]['kernel'])[idle], np.asarray(before[name]['kernel'])[idle]
      )
      alpha = np.asarray(sparse_params(params, state)[name]['kernel'])
      np.testing.assert_array_equal(alpha[~masks[name]], 0.0)
  changed = any(not np.array_equal(first[k], kernel_masks(state)[k]) for k in KERNELS)
  assert changed == (method != 'static')


def test_static_mask_is_random_exact_and_seeded():
  params = {'k': jnp.arange(1.0, 101.0).reshape(10, 10)}  # magnitudes would pick the last 25
  masks = [
    np.asarray(
      static_sparse(optax.sgd(0.1), sparsity_level=S, seed=s).init(params).forward_mask['k']
    )
    for s in (0, 0, 3)
  ]
  assert all(m.sum() == 25 for m in masks)
  np.testing.assert_array_equal(masks[0], masks[1])
  assert not np.array_equal(masks[0], masks[2])
  assert not np.array_equal(masks[0], reference_mask(params['k'], 25))


def test_rigl_grown_weights_and_adam_state_start_at_zero():
  # A refresh every step: weights dropped earlier (with Adam moments) come back later.
  tx = rigl(optax.adam(0.05), sparsity_level=S, end_step=100, update_every=1, drop_fraction=0.5)
  params, state, _, new_params, new_state = one_update(tx, steps_before=4)
  old, adam = state.inner_state[0], new_state.inner_state[0]
  had_state = False
  for name in KERNELS:
    before, after = kernel_masks(state)[name], kernel_masks(new_state)[name]
    grown = after & ~before
    assert grown.sum() > 0
    assert np.all(np.asarray(new_params[name]['kernel'])[grown] == 0)
    for moment, old_moment in ((adam.mu, old.mu), (adam.nu, old.nu)):
      had_state |= np.any(np.asarray(old_moment[name]['kernel'])[grown] != 0)
      assert np.all(np.asarray(moment[name]['kernel'])[grown] == 0)
      assert np.any(np.asarray(moment[name]['kernel'])[after & before] != 0)  # kept: untouched
  assert had_state, 'no grown weight had optimizer state to zero: the test would not bite'


def test_magnitude_pruning_follows_the_cubic_schedule_at_every_update():
  begin, end, every, lr = 2, 14, 4, 0.05
  tx = magnitude_pruning(
    optax.sgd(lr), sparsity_level=S, begin_step=begin, end_step=end, update_every=every
  )
  params = init_params()
  state = tx.init(params)
  assert all(m.all() for m in kernel_masks(state).values())  # dense at start
  for count, batch in enumerate(batches(3, 18), start=1):
    grads = jax.grad(mlp_loss)(sparse_params(params, state), batch)
    updates, new_state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    due = begin <= count <= end and ((count - begin) % every == 0 or count == end)
    for name in KERNELS:
      mask = kernel_masks(state)[name]
      after = np.asarray(params[name]['kernel']) - lr * np.where(mask, grads[name]['kernel'], 0)
      n = mask.size
      progress = min(max((count - begin) / (end - begin), 0.0), 1.0)
      k = round((1 - S * (1 - (1 - progress) ** 3)) * n) if count < end else round((1 - S) * n)
      expected = first_by_key(mask, np.abs(after), k) if due else mask
      np.testing.assert_array_equal(kernel_masks(new_state)[name], expected)
    params, state = new_params, new_state
  assert all(m.sum() == round((1 - S) * m.size) for m in kernel_masks(state).values())


def test_ste_trains_every_weight_on_the_top_k_of_the_current_params():
  """STE's defining properties, checked against numpy at every step: the forward pass uses
  exactly the top-k of |theta| as it is now, and plain SGD moves every weight by the gradient
  taken at that sparse point (nothing is held back, no penalty)."""
  lr, params = 0.1, init_params()
  tx = ste(optax.sgd(lr), sparsity_level=0.9)
  state = tx.init(params)
  grad_at_sparse_point = jax.jit(lambda p, s, b: jax.grad(mlp_loss)(sparse_params(p, s), b))
  step = jax.jit(make_step(tx))
  for batch in batches(4, 5):
    in_a = {}
    for name in KERNELS:
      kernel = np.asarray(params[name]['kernel'])
      in_a[name] = np.asarray(unpack_masks(state.forward_mask)[name]['kernel'])
      np.testing.assert_array_equal(in_a[name], reference_mask(kernel, round(0.1 * kernel.size)))
    grads = grad_at_sparse_point(params, state, batch)
    new_params, state = step(params, state, batch)
    expected = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    chex.assert_trees_all_close(new_params, expected, rtol=1e-6, atol=1e-7)
    for name in KERNELS:  # the straight-through gradient moves weights outside A too
      moved = np.asarray(new_params[name]['kernel'] != params[name]['kernel'])
      assert moved[~in_a[name]].any(), name
    params = new_params


@pytest.mark.parametrize('method', ['set', 'rigl', 'gmp'])
def test_pmap_on_8_devices_matches_jit(method):
  n_dev = jax.local_device_count()
  assert n_dev == 8, 'conftest.py sets 8 fake CPU devices'
  if method == 'gmp':
    tx = magnitude_pruning(optax.adam(0.02), sparsity_level=S, end_step=6, update_every=2)
  else:
    tx = CONSTANT[method](optax.adam(0.02), update_every=2)

  def pmapped(params, opt_state, batch):
    grads = jax.grad(mlp_loss)(sparse_params(params, opt_state), batch)
    grads = jax.lax.pmean(grads, axis_name='batch')
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = init_params()
  state = tx.init(params)
  p_step, j_step = jax.pmap(pmapped, axis_name='batch'), jax.jit(make_step(tx))
  rp, rs = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_dev, *jnp.shape(x))), (params, state))
  for x, y in batches(5, 8, n=32):
    sharded = (x.reshape(n_dev, -1, x.shape[-1]), y.reshape(n_dev, -1, y.shape[-1]))
    rp, rs = p_step(rp, rs, sharded)
    params, state = j_step(params, state, (x, y))
  for replica in range(n_dev):
    chex.assert_trees_all_equal(
      jax.tree.map(lambda x, r=replica: x[r], rs.forward_mask), state.forward_mask
    )
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], rp), params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('method', ['static', 'set', 'rigl', 'gmp', 'ste'])
def test_sparse_params_metrics_and_export_for_every_method(method):
  inner = optax.sgd(0.1)
  tx = {
    'gmp': lambda: magnitude_pruning(inner, sparsity_level=S, end_step=2, update_every=1),
    'ste': lambda: ste(inner, sparsity_level=S),
  }.get(method, lambda: CONSTANT[method](inner, update_every=1))()
  params = init_params()
  state = optax.chain(optax.identity(), tx).init(params)
  step = make_step(optax.chain(optax.identity(), tx))
  for batch in batches(6, 3):
    params, state = step(params, state, batch)
  metrics = topkast_jax.sparsity_metrics(state)
  assert float(metrics['forward_density']) == pytest.approx(1 - S, abs=0.01)
  assert float(metrics['hidden/kernel/forward_density']) == 1 - S
  exported = export.export_sparse(params, state)
  assert exported['hidden']['kernel'].nse == round((1 - S) * 120)
  chex.assert_trees_all_equal(export.densify(exported), sparse_params(params, state))


@pytest.mark.parametrize(
  'build, message',
  [
    (lambda: static_sparse(None, sparsity_level=0.9), r'static_sparse wraps an optimizer'),
    (lambda: static_sparse(optax.sgd(0.1), sparsity_level=1.0), r'sparsity_level must be in'),
    (lambda: static_sparse(optax.sgd(0.1), sparsity_level='0.9'), r'sparsity_level must be a'),
    (lambda: static_sparse(optax.sgd(0.1), sparsity_level=0.9, seed=-1), r'seed must be in'),
    (
      lambda: static_sparse(optax.sgd(0.1), sparsity_level=0.9, distribution='er'),
      r'distribution must be',
    ),
    (lambda: rigl(optax.sgd(0.1), sparsity_level=0.9, end_step=0), r'end_step must be in'),
    (
      lambda: rigl(optax.sgd(0.1), sparsity_level=0.9, end_step=10, update_every=0),
      r'update_every must be in',
    ),
    (
      lambda: set_sparse(optax.sgd(0.1), sparsity_level=0.9, end_step=10, drop_fraction=1.5),
      r'drop_fraction must be in \[0, 1\]',
    ),
    (
      lambda: set_sparse(optax.sgd(0.1), sparsity_level=0.9, end_step=10, drop_fraction='x'),
      r'drop_fraction must be a float or a schedule',
    ),
    (
      lambda: magnitude_pruning(optax.sgd(0.1), sparsity_level=0.9, begin_step=5, end_step=4),
      r'end_step must be in \[5,',
    ),
    (
      lambda: magnitude_pruning(optax.sgd(0.1), sparsity_level=0.9, end_step=4.0),
      r'end_step must be a Python int',
    ),
  ],
)
def test_bad_hyperparameters_raise_when_built(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_bad_input_at_init_and_update():
  tx = static_sparse(optax.sgd(0.1), sparsity_level=0.5, sparsity={'hidden': (0.5, 0.2)})
  with pytest.raises(ValueError, match=r'\(forward, backward\) pair .* is for topkast'):
    tx.init(init_params())
  tx = rigl(optax.sgd(0.1), sparsity_level=0.5, end_step=10)
  state = tx.init(init_params())
  with pytest.raises(ValueError, match=r'needs the current params'):
    tx.update(init_params(), state)
  with pytest.raises(ValueError, match=r"do not match the optimizer state at 'hidden/kernel'"):
    tx.update(init_params(d_hidden=11), state, init_params(d_hidden=11))


@pytest.mark.parametrize('method', ['set', 'rigl', 'magnitude_pruning'])
def test_a_mask_change_holds_one_leafs_temporaries_at_a_time(method):
  """XLA's memory analysis of the compiled, donated step: each leaf the model adds costs the
  step at most 3 leaves' bytes more than it costs dense Adam (the updates and the params after
  them are the mask change's inputs); computing every leaf's keys before the first selection
  cost SET 9 (engine._one_leaf_at_a_time)."""
  shape, leaf_mib = (256, 256), 256 * 256 * 4 / 2**20
  build = {
    'set': lambda: set_sparse(optax.adam(1e-3), sparsity_level=0.9, end_step=1000),
    'rigl': lambda: rigl(optax.adam(1e-3), sparsity_level=0.9, end_step=1000),
    'magnitude_pruning': lambda: magnitude_pruning(optax.adam(1e-3), sparsity_level=0.9, end_step=1000),
  }  # fmt: skip

  def temporaries_mib(tx, n_leaves):
    params = {f'layer_{i}': jax.ShapeDtypeStruct(shape, jnp.float32) for i in range(n_leaves)}

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20

  excess = [
    temporaries_mib(build[method](), n) - temporaries_mib(optax.adam(1e-3), n) for n in (2, 6)
  ]
  assert (excess[1] - excess[0]) / 4 <= 3 * leaf_mib, excess
