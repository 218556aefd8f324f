"""Metrics on a hand-built scenario whose values are known exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topkast_jax import exploration_penalty, sparsity_metrics, topkast, unpack_masks


def test_known_mask_dynamics_and_penalty():
  lam = 0.01
  w = jnp.arange(1.0, 11.0)[None, :]  # |A| = 2 (indices 8, 9), |B| = 5 (indices 5..9)
  params = {'w': w, 'v': jnp.ones((2, 10)), 'bias': jnp.zeros(3)}
  tx = topkast(
    forward_sparsity=0.8,
    backward_sparsity=0.5,
    update_every=1,
    exploration_l2=lam,
    track_mask_changes=True,
  )
  state = tx.init(params)
  # Index 0 jumps from C into A, index 5 from B \ A into A: both old members of A leave it.
  moved = w.at[0, 0].set(100.0).at[0, 5].set(50.0)
  new_params = dict(params, w=moved)
  penalty = jax.device_get(exploration_penalty(new_params, state, lam, per_leaf=True))
  total = float(exploration_penalty(new_params, state, lam))
  _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, new_params)
  m = jax.device_get(sparsity_metrics(state))

  assert m['w/forward_density'] == pytest.approx(0.2)
  assert m['w/backward_density'] == pytest.approx(0.5)
  assert m['w/forward_change'] == pytest.approx(1.0)
  assert m['w/entered_from_c'] == pytest.approx(0.1)  # only index 0 came from C
  assert m['v/forward_change'] == pytest.approx(0.0)
  # The penalty uses the state's masks (those of the update): A = {8, 9}, B \ A = {5, 6, 7}.
  expected_w = 0.5 * lam * (9.0**2 + 10.0**2 + (50.0**2 + 7.0**2 + 8.0**2) / 0.2)
  assert penalty == pytest.approx({'w': expected_w, 'v': 0.5 * lam * (4 + 6 / 0.2)}, rel=1e-6)
  assert total == pytest.approx(sum(penalty.values()), rel=1e-6)
  assert not any('penalty' in k for k in m)
  # Overall values weight leaves by size (forward_change by |A|).
  assert m['forward_density'] == pytest.approx(0.2)
  assert m['forward_change'] == pytest.approx((1.0 * 2 + 0.0 * 4) / 6)
  assert m['entered_from_c'] == pytest.approx(1 / 30)
  assert int(m['sparse_weights']) == 30
  assert not any(k.startswith('bias') for k in m)


def test_entered_from_c_counts_a_path_through_b_over_several_refreshes():
  w = jnp.arange(1.0, 11.0)[None, :]  # |A| = 2 (indices 8, 9), |B| = 5 (indices 5..9)
  tx = topkast(forward_sparsity=0.8, backward_sparsity=0.5, track_mask_changes=True)
  state = tx.init({'w': w})
  update = jax.jit(tx.update)
  zeros = {'w': jnp.zeros_like(w)}
  # Index 0 (in C at init) moves into B \ A at one refresh, into A at the next.
  for value in (7.5, 100.0):
    _, state = update(zeros, state, {'w': w.at[0, 0].set(value)})
    in_a = bool(unpack_masks(state.forward_mask)['w'][0, 0])
    assert bool(state.entered_from_c['w'][0, 0]) == in_a == (value == 100.0)
  # It stays counted after it leaves A again; weights never in C never count.
  _, state = update(zeros, state, {'w': w})
  assert np.asarray(state.entered_from_c['w']).nonzero()[1].tolist() == [0]
  assert float(sparsity_metrics(state)['entered_from_c']) == pytest.approx(0.1)


@pytest.mark.parametrize('tracked', [True, False])
def test_overall_only(tracked):
  params = {'w': jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)}
  tx = topkast(forward_sparsity=0.75, backward_sparsity=0.5, track_mask_changes=tracked)
  state = tx.init(params)
  m = sparsity_metrics(state, per_leaf=False)
  changes = {'forward_change', 'entered_from_c'} if tracked else set()
  assert set(m) == {'forward_density', 'backward_density', 'sparse_weights'} | changes
  assert float(m['forward_density']) == pytest.approx(0.25)
