"""Top-KAST transformation semantics, against the spec (../shared/topkast_spec.md, sec. 1)."""

import functools
import inspect
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import topkast_jax
from topkast_jax import exploration_penalty, sparse_params, topkast, unpack_masks

FWD, BWD = 0.9, 0.8


def init_params(seed=0, d_in=12, d_hidden=10, d_out=4):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    'hidden': {'kernel': jax.random.normal(k1, (d_in, d_hidden)), 'bias': jnp.zeros(d_hidden)},
    'out': {'kernel': jax.random.normal(k2, (d_hidden, d_out)), 'bias': jnp.zeros(d_out)},
  }


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params['hidden']['kernel'] + params['hidden']['bias'])
  return jnp.mean((h @ params['out']['kernel'] + params['out']['bias'] - y) ** 2)


def batches(seed, steps, n=16, d_in=12, d_out=4):
  rng = np.random.default_rng(seed)
  return [
    (
      rng.standard_normal((n, d_in)).astype(np.float32),
      rng.standard_normal((n, d_out)).astype(np.float32),
    )
    for _ in range(steps)
  ]


def make_step(tx, loss_fn=mlp_loss):

  def step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(sparse_params(params, opt_state), batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def reference_mask(x, k):
  order = np.argsort(-np.abs(np.asarray(x)).ravel(), kind='stable')
  mask = np.zeros(np.size(x), bool)
  mask[order[:k]] = True
  return mask.reshape(np.shape(x))


def rounded_count(density, n):
  return int(np.floor(density * n + 0.5 + 1e-9))


def test_init_masks_are_exact_topk_and_nested():
  params = init_params()
  state = topkast(optax.sgd(0.1), forward_sparsity=FWD, backward_sparsity=BWD).init(params)
  for name in ('hidden', 'out'):
    w = params[name]['kernel']
    a, b = (
      unpack_masks(state.forward_mask)[name]['kernel'],
      unpack_masks(state.backward_mask)[name]['kernel'],
    )
    np.testing.assert_array_equal(a, reference_mask(w, rounded_count(1 - FWD, w.size)))
    np.testing.assert_array_equal(b, reference_mask(w, rounded_count(1 - BWD, w.size)))
    assert not np.any(np.asarray(a) & ~np.asarray(b))
    assert isinstance(unpack_masks(state.forward_mask)[name]['bias'], optax.MaskedNode)


def test_exact_counts_when_all_weights_equal():
  params = {'kernel': jnp.full((10, 10), 0.25)}
  state = topkast(optax.sgd(0.1), forward_sparsity=FWD, backward_sparsity=BWD).init(params)
  a, b = unpack_masks(state.forward_mask)['kernel'], unpack_masks(state.backward_mask)['kernel']
  assert int(a.sum()) == 10 and int(b.sum()) == 20
  np.testing.assert_array_equal(np.flatnonzero(a), np.arange(10))
  np.testing.assert_array_equal(np.flatnonzero(b), np.arange(20))


def test_sparse_params_zero_outside_forward_set():
  params = init_params()
  state = topkast(optax.sgd(0.1), forward_sparsity=FWD, backward_sparsity=BWD).init(params)
  alpha = sparse_params(params, state)
  w, a = params['hidden']['kernel'], unpack_masks(state.forward_mask)['hidden']['kernel']
  np.testing.assert_array_equal(alpha['hidden']['kernel'], np.where(a, w, 0.0))
  chex.assert_trees_all_equal(alpha['out']['bias'], params['out']['bias'])


class GradientTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_restricted_and_regularised(self):
    """Link form (no inner optimizer) returns exactly the gradient it hands on."""
    lam = 0.01
    params = init_params()
    tx = topkast(forward_sparsity=FWD, backward_sparsity=BWD, exploration_l2=lam)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    out, new_state = self.variant(tx.update)(grads, state, params)
    for name in ('hidden', 'out'):
      w = np.asarray(params[name]['kernel'])
      a = np.asarray(unpack_masks(state.forward_mask)[name]['kernel'])
      b = np.asarray(unpack_masks(state.backward_mask)[name]['kernel'])
      expected = np.where(a, 0.5 + lam * w, np.where(b, 0.5 + lam / (1 - FWD) * w, 0.0))
      np.testing.assert_allclose(out[name]['kernel'], expected, rtol=1e-6)
      # Dense leaves pass through unchanged: no restriction, no penalty.
      chex.assert_trees_all_equal(out[name]['bias'], grads[name]['bias'])
      expected_penalty = (
        0.5 * lam * np.sum(np.where(a, 1.0, np.where(b, 1 / (1 - FWD), 0.0)) * w**2)
      )
      penalty = exploration_penalty(params, state, lam, per_leaf=True)
      np.testing.assert_allclose(penalty[f'{name}/kernel'], expected_penalty, rtol=1e-5)


@pytest.mark.parametrize('every', [1, 3])
def test_masks_refresh_from_params_after_update(every):
  params = init_params()
  tx = topkast(
    optax.sgd(0.5, momentum=0.9), forward_sparsity=FWD, backward_sparsity=BWD, update_every=every
  )
  state = tx.init(params)
  step = jax.jit(make_step(tx))
  for t, batch in enumerate(batches(0, 7)):
    old_a = unpack_masks(state.forward_mask)
    params, state = step(params, state, batch)
    w = params['hidden']['kernel']
    if (t + 1) % every == 0:
      np.testing.assert_array_equal(
        unpack_masks(state.forward_mask)['hidden']['kernel'],
        reference_mask(w, rounded_count(1 - FWD, w.size)),
      )
      np.testing.assert_array_equal(
        unpack_masks(state.backward_mask)['hidden']['kernel'],
        reference_mask(w, rounded_count(1 - BWD, w.size)),
      )
    else:
      chex.assert_trees_all_equal(
        unpack_masks(state.forward_mask), old_a
      )  # constant between refreshes
  assert int(state.count) == 7


@pytest.mark.parametrize(
  'optimizer',
  [
    optax.sgd(0.1),
    optax.sgd(0.1, momentum=0.9),
    optax.sgd(0.1, momentum=0.9, nesterov=True),
    optax.adam(0.05),
    optax.adamw(0.05, weight_decay=0.1),
  ],
  ids=['sgd', 'momentum', 'nesterov', 'adam', 'adamw'],
)
def test_weights_outside_b_bit_identical(optimizer):
  params = init_params()
  tx = topkast(
    optimizer, forward_sparsity=FWD, backward_sparsity=BWD, update_every=5, exploration_l2=1e-3
  )
  state = tx.init(params)
  step = jax.jit(make_step(tx))
  never_in_b = jax.tree.map(lambda b: ~np.asarray(b), unpack_masks(state.backward_mask))
  start = params
  for batch in batches(1, 50):
    before, b = params, unpack_masks(state.backward_mask)
    params, state = step(params, state, batch)
    for name in ('hidden', 'out'):
      outside = ~np.asarray(b[name]['kernel'])
      np.testing.assert_array_equal(
        np.asarray(params[name]['kernel'])[outside], np.asarray(before[name]['kernel'])[outside]
      )
      never_in_b[name]['kernel'] &= ~np.asarray(unpack_masks(state.backward_mask)[name]['kernel'])
  for name in ('hidden', 'out'):
    c = never_in_b[name]['kernel']
    assert c.sum() > 0
    np.testing.assert_array_equal(
      np.asarray(params[name]['kernel'])[c], np.asarray(start[name]['kernel'])[c]
    )
  assert not np.array_equal(params['hidden']['bias'], start['hidden']['bias'])


def test_numpy_reference_20_steps_momentum():
  """Independent numpy implementation: linear model, momentum SGD, lambda > 0, refresh every 3."""
  lr, mu, lam, every = 0.05, 0.9, 0.01, 3
  rng = np.random.default_rng(3)
  theta0 = rng.standard_normal((12, 6)).astype(np.float32)
  data = [
    (
      rng.standard_normal((16, 12)).astype(np.float32),
      rng.standard_normal((16, 6)).astype(np.float32),
    )
    for _ in range(20)
  ]
  k_a, k_b = rounded_count(1 - FWD, theta0.size), rounded_count(1 - BWD, theta0.size)

  theta, bias = theta0.copy(), np.zeros(6, np.float32)
  trace_w, trace_b = np.zeros_like(theta), np.zeros_like(bias)
  a, b = reference_mask(theta, k_a), reference_mask(theta, k_b)
  for t, (x, y) in enumerate(data):
    residual = x @ np.where(a, theta, 0) + bias - y
    g_w, g_b = x.T @ residual / len(x), residual.mean(0)
    g_w = np.where(b, g_w, 0) + lam * np.where(a, 1, np.where(b, 1 / (1 - FWD), 0)) * theta
    trace_w, trace_b = g_w + mu * trace_w, g_b + mu * trace_b
    theta = theta - lr * np.where(b, trace_w, 0)
    bias = bias - lr * trace_b
    if (t + 1) % every == 0:
      a, b = reference_mask(theta, k_a), reference_mask(theta, k_b)

  def loss(p, batch):
    x, y = batch
    return 0.5 * jnp.sum((x @ p['w'] + p['b'] - y) ** 2) / x.shape[0]

  tx = topkast(
    optax.sgd(lr, momentum=mu),
    forward_sparsity=FWD,
    backward_sparsity=BWD,
    update_every=every,
    exploration_l2=lam,
  )
  params = {'w': jnp.asarray(theta0), 'b': jnp.zeros(6)}
  state = tx.init(params)
  step = jax.jit(make_step(tx, loss))
  for batch in data:
    params, state = step(params, state, batch)
  np.testing.assert_allclose(params['w'], theta, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(params['b'], bias, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(unpack_masks(state.forward_mask)['w'], a)
  np.testing.assert_array_equal(unpack_masks(state.backward_mask)['w'], b)


def test_zero_forward_sparsity_reproduces_inner_optimizer():
  params = init_params()
  plain, wrapped = (
    optax.adam(0.01),
    topkast(optax.adam(0.01), forward_sparsity=0.0, backward_sparsity=0.0, exploration_l2=0.1),
  )
  p1, s1 = params, plain.init(params)
  p2, s2 = params, wrapped.init(params)
  for batch in batches(4, 10):
    g1 = jax.grad(mlp_loss)(p1, batch)
    u1, s1 = plain.update(g1, s1, p1)
    p1 = optax.apply_updates(p1, u1)
    p2, s2 = make_step(wrapped)(p2, s2, batch)
  chex.assert_trees_all_equal(p1, p2)


def test_backward_equal_forward_gives_b_equal_a_and_zero_gives_straight_through():
  params = init_params()
  state = topkast(optax.sgd(0.1), forward_sparsity=0.7, backward_sparsity=0.7).init(params)
  chex.assert_trees_all_equal(unpack_masks(state.forward_mask), unpack_masks(state.backward_mask))

  tx = topkast(forward_sparsity=0.9, backward_sparsity=0.0)
  state = tx.init(params)
  assert all(bool(jnp.all(b)) for b in jax.tree.leaves(unpack_masks(state.backward_mask)))
  grads = jax.tree.map(jnp.ones_like, params)
  out, _ = tx.update(grads, state, params)
  chex.assert_trees_all_equal(out, grads)  # every weight gets the gradient w.r.t. alpha


def test_reset_inner_state_when_weight_leaves_b():
  params = init_params()
  kwargs = dict(forward_sparsity=FWD, backward_sparsity=BWD, update_every=2)
  keep = topkast(optax.sgd(0.3, momentum=0.9), **kwargs)
  reset = topkast(optax.sgd(0.3, momentum=0.9), reset_inner_state_on_exit=True, **kwargs)
  p_keep, s_keep = params, keep.init(params)
  p_reset, s_reset = params, reset.init(params)
  left_total = 0
  keep_step, reset_step = jax.jit(make_step(keep)), jax.jit(make_step(reset))
  for batch in batches(5, 10):
    old_b = unpack_masks(s_reset.backward_mask)['hidden']['kernel']
    p_keep, s_keep = keep_step(p_keep, s_keep, batch)
    p_reset, s_reset = reset_step(p_reset, s_reset, batch)
    left = np.asarray(old_b & ~unpack_masks(s_reset.backward_mask)['hidden']['kernel'])
    left_total += left.sum()
    trace = np.asarray(s_reset.inner_state[0].trace['hidden']['kernel'])
    np.testing.assert_array_equal(trace[left], 0.0)
  assert left_total > 0, 'the test needs weights that leave B'
  assert np.any(np.asarray(s_keep.inner_state[0].trace['hidden']['kernel']) != 0)


def test_pmap_matches_jit_and_masks_agree_on_replicas():
  n_dev = jax.local_device_count()
  assert n_dev == 8, 'conftest.py sets 8 fake CPU devices'
  tx = topkast(
    optax.sgd(0.2, momentum=0.9),
    forward_sparsity=FWD,
    backward_sparsity=BWD,
    update_every=2,
    exploration_l2=1e-3,
  )
  params = init_params()
  state = tx.init(params)
  data = batches(6, 6, n=32)

  def pmapped(params, opt_state, batch):
    grads = jax.grad(mlp_loss)(sparse_params(params, opt_state), batch)
    grads = jax.lax.pmean(grads, axis_name='batch')
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  p_step = jax.pmap(pmapped, axis_name='batch')
  j_step = jax.jit(make_step(tx))
  rp, rs = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_dev, *jnp.shape(x))), (params, state))
  jp, js = params, state
  for x, y in data:
    sharded = (x.reshape(n_dev, -1, x.shape[-1]), y.reshape(n_dev, -1, y.shape[-1]))
    rp, rs = p_step(rp, rs, sharded)
    jp, js = j_step(jp, js, (x, y))
  for replica in range(1, n_dev):
    chex.assert_trees_all_equal(
      jax.tree.map(lambda x, r=replica: x[r], unpack_masks(rs.forward_mask)),
      jax.tree.map(lambda x: x[0], unpack_masks(rs.forward_mask)),
    )
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], rp), jp, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(
    jax.tree.map(lambda x: x[0], unpack_masks(rs.backward_mask)), unpack_masks(js.backward_mask)
  )


def test_chain_with_clipping():
  params = init_params()
  inner = functools.partial(
    topkast, forward_sparsity=FWD, backward_sparsity=BWD, exploration_l2=1e-3
  )
  chained = optax.chain(optax.clip_by_global_norm(0.25), inner(optax.adam(1e-2)))
  alone, clip = inner(optax.adam(1e-2)), optax.clip_by_global_norm(0.25)
  s_chain, s_alone = chained.init(params), alone.init(params)
  p_chain = p_alone = params
  for batch in batches(7, 5):
    p_chain, s_chain = make_step(chained)(p_chain, s_chain, batch)
    grads = jax.grad(mlp_loss)(sparse_params(p_alone, s_alone), batch)
    grads, _ = clip.update(grads, clip.init(params))
    u, s_alone = alone.update(grads, s_alone, p_alone)
    p_alone = optax.apply_updates(p_alone, u)
  chex.assert_trees_all_close(p_chain, p_alone, rtol=1e-6)


def test_inject_hyperparams_outside_and_inside():
  params = init_params()
  static = ('forward_sparsity', 'backward_sparsity', 'update_every', 'reset_inner_state_on_exit')
  outer = optax.inject_hyperparams(topkast, static_args=static)(
    optax.sgd(0.1, momentum=0.9),
    forward_sparsity=FWD,
    backward_sparsity=BWD,
    update_every=2,
    exploration_l2=1e-3,
    reset_inner_state_on_exit=False,
  )
  inner = topkast(
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
    forward_sparsity=FWD,
    backward_sparsity=BWD,
    update_every=2,
    exploration_l2=1e-3,
    reset_inner_state_on_exit=True,
  )
  plain = topkast(
    optax.sgd(0.1, momentum=0.9),
    forward_sparsity=FWD,
    backward_sparsity=BWD,
    update_every=2,
    exploration_l2=1e-3,
  )
  results = []
  for tx in (outer, inner, plain):
    p, s, step = params, tx.init(params), jax.jit(make_step(tx))
    for batch in batches(8, 6):
      p, s = step(p, s, batch)
    results.append(p)
    assert int(topkast_jax.find_sparse_state(s).count) == 6
  chex.assert_trees_all_close(results[0], results[2], rtol=1e-6)
  assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), results[1]))


def test_multisteps_accumulates_then_updates_once():
  params = init_params()
  kwargs = dict(forward_sparsity=FWD, backward_sparsity=BWD, update_every=1)
  multi = optax.MultiSteps(topkast(optax.sgd(0.1), **kwargs), every_k_schedule=2)
  single = topkast(optax.sgd(0.1), **kwargs)
  s_multi, s_single = multi.init(params), single.init(params)
  b1, b2 = batches(9, 2)
  p = params
  for batch in (b1, b2):
    grads = jax.grad(mlp_loss)(sparse_params(p, s_multi), batch)
    u, s_multi = multi.update(grads, s_multi, p)
    p = optax.apply_updates(p, u)
  alpha = sparse_params(params, s_single)
  mean = jax.tree.map(
    lambda x, y: (x + y) / 2, jax.grad(mlp_loss)(alpha, b1), jax.grad(mlp_loss)(alpha, b2)
  )
  u, s_single = single.update(mean, s_single, params)
  chex.assert_trees_all_close(p, optax.apply_updates(params, u), rtol=1e-6)
  assert int(topkast_jax.find_sparse_state(s_multi).count) == 1


def test_link_form_in_chain_keeps_c_fixed_under_plain_sgd():
  params = init_params()
  tx = optax.chain(
    topkast(forward_sparsity=FWD, backward_sparsity=BWD, update_every=3), optax.sgd(0.1)
  )
  state = tx.init(params)
  for batch in batches(10, 6):
    before, b = params, unpack_masks(topkast_jax.find_sparse_state(state).backward_mask)
    params, state = make_step(tx)(params, state, batch)
    outside = ~np.asarray(b['out']['kernel'])
    np.testing.assert_array_equal(
      np.asarray(params['out']['kernel'])[outside], np.asarray(before['out']['kernel'])[outside]
    )


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (
      dict(forward_sparsity=1.0, backward_sparsity=0.5),
      r'forward_sparsity must be in \[0, 1\), got 1.0',
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=-0.5),
      r'backward_sparsity must be in \[0, 1\), got -0.5',
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.9),
      r'backward_sparsity \(0.9\) must not exceed forward_sparsity \(0.8\)',
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, update_every=0),
      r'update_every must be in \[1, 2\*\*31\) \(an int32 step count\), got 0',
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, update_every=2.5),
      'update_every must be a Python int',
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=-1e-4),
      'exploration_l2 must be finite and >= 0, got -0.0001',
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, update_every=2**31),
      r'update_every must be in \[1, 2\*\*31\)',
    ),
    (dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=float('nan')), 'got nan'),
    (dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2=np.inf), 'got inf'),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, exploration_l2='1e-4'),
      "exploration_l2 must be a number or a scalar array, got '1e-4'",
    ),
    (
      dict(forward_sparsity=jnp.array(0.8), backward_sparsity=0.5),
      'forward_sparsity must be a Python float',
    ),
  ],
)
def test_bad_hyperparameters_raise_when_built(kwargs, message):
  with pytest.raises(ValueError, match=message):
    topkast(optax.sgd(0.1), **kwargs)


def test_bad_input_raises_at_init_or_update():
  params = init_params()
  with pytest.raises(ValueError, match="'conv_0' matches no parameter"):
    topkast(
      optax.sgd(0.1), forward_sparsity=FWD, backward_sparsity=BWD, sparsity={'conv_0': 0}
    ).init(params)
  with pytest.raises(ValueError, match='needs a wrapped optimizer'):
    topkast(forward_sparsity=FWD, backward_sparsity=BWD, reset_inner_state_on_exit=True)
  tx = topkast(optax.sgd(0.1), forward_sparsity=FWD, backward_sparsity=BWD)
  state = tx.init(params)
  other = init_params(d_hidden=11)
  other_grads = jax.tree.map(jnp.zeros_like, other)
  with pytest.raises(ValueError, match="do not match the optimizer state at 'hidden/kernel'"):
    tx.update(other_grads, state, other)
  with pytest.raises(ValueError, match='structure of the params'):
    sparse_params({'only': jnp.ones((3, 3))}, state)
  with pytest.raises(ValueError, match='needs the current params'):
    tx.update(jax.tree.map(jnp.zeros_like, params), state)
  with pytest.raises(ValueError, match='exactly one sparse-training state'):
    sparse_params(params, optax.sgd(0.1).init(params))


def test_more_bad_input_gets_clear_errors():
  tx = topkast(optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.5)
  with pytest.raises(ValueError, match=r"'tiny/kernel' has 2 entries.*= 0 weights.*dense"):
    tx.init({'tiny': {'kernel': jnp.ones((1, 2))}})
  with pytest.raises(ValueError, match="'conv_0\\[' is not a valid regular expression"):
    topkast(
      optax.sgd(0.1), forward_sparsity=FWD, backward_sparsity=BWD, sparsity={'conv_0[': 0}
    ).init(init_params())


def test_empty_params_give_an_empty_state_like_optax():
  tx = topkast(optax.sgd(0.1, momentum=0.9), forward_sparsity=FWD, backward_sparsity=BWD)
  state = tx.init({})
  updates, state = tx.update({}, state, {})
  assert updates == {} and int(state.count) == 1


def test_link_form_stays_finite_with_inf_weights_outside_b():
  params = init_params()
  tx = topkast(forward_sparsity=FWD, backward_sparsity=BWD, exploration_l2=1e-3)
  state = tx.init(params)
  c = ~np.asarray(unpack_masks(state.backward_mask)['hidden']['kernel'])
  kernel = np.asarray(params['hidden']['kernel']).copy()
  kernel[np.argwhere(c)[0][0], np.argwhere(c)[0][1]] = np.inf  # a weight in C
  params = {**params, 'hidden': {**params['hidden'], 'kernel': jnp.asarray(kernel)}}
  grads = jax.tree.map(jnp.ones_like, params)
  assert np.isfinite(float(exploration_penalty(params, state, 1e-3)))  # the inf is in C
  updates, state = tx.update(grads, state, params)
  assert np.isfinite(np.asarray(updates['hidden']['kernel'])).all()
  np.testing.assert_array_equal(np.asarray(updates['hidden']['kernel'])[c], 0.0)


def test_sparse_value_and_grad_equals_grad_at_sparse_params():
  params, batch = init_params(), batches(3, 1)[0]
  tx = topkast(optax.sgd(0.1), forward_sparsity=FWD, backward_sparsity=BWD)
  state = tx.init(params)
  loss, grads = topkast_jax.sparse_value_and_grad(mlp_loss)(params, state, batch)
  want_loss, want = jax.value_and_grad(mlp_loss)(sparse_params(params, state), batch)
  chex.assert_trees_all_close((loss, grads), (want_loss, want))
  dense_loss = mlp_loss(params, batch)
  assert not np.isclose(float(loss), float(dense_loss))  # it is not the dense point
  aux = topkast_jax.sparse_value_and_grad(lambda p, b: (mlp_loss(p, b), 7), has_aux=True)
  (loss_aux, seven), _ = aux(params, state, batch)
  assert seven == 7 and np.isclose(float(loss_aux), float(loss))
  with pytest.raises(ValueError, match='structure of the params'):
    topkast_jax.sparse_value_and_grad(mlp_loss)({'other': jnp.ones((2, 2))}, state, batch)


def test_long_refresh_with_wide_b_warns_and_the_default_does_not():
  assert inspect.signature(topkast).parameters['update_every'].default == 1  # the paper's
  with pytest.warns(
    UserWarning, match=r'update_every=100 with B 10x as wide as A .*update_every=1'
  ):
    topkast(optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.0, update_every=100)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    topkast(optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.0)  # every step
    topkast(optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.8, update_every=100)  # 2x


def test_tracking_mask_changes_only_adds_diagnostics():
  def run(tracked):
    tx = topkast(
      optax.sgd(0.1, momentum=0.9),
      forward_sparsity=FWD,
      backward_sparsity=0.5,
      exploration_l2=1e-3,
      track_mask_changes=tracked,
    )
    params = init_params()
    state = tx.init(params)
    step = jax.jit(make_step(tx))
    changes = []
    for batch in batches(2, 20):
      params, state = step(params, state, batch)
      changes.append(state.forward_change and float(state.forward_change['hidden']['kernel']))
    return params, state, changes

  params, state, _ = run(False)
  tracked_params, tracked_state, changes = run(True)
  chex.assert_trees_all_equal(params, tracked_params)
  chex.assert_trees_all_equal(
    (unpack_masks(state.forward_mask), unpack_masks(state.backward_mask), state.inner_state),
    (
      unpack_masks(tracked_state.forward_mask),
      unpack_masks(tracked_state.backward_mask),
      tracked_state.inner_state,
    ),
  )
  assert state.entered_from_c is None and state.forward_change is None
  # The masks moved, so the tracked diagnostics have something to show.
  assert max(changes) > 0
  assert tracked_state.entered_from_c['hidden']['kernel'].shape == (12, 10)
