"""Bad input to the sparse methods is a clear error (or a warning) where it is given, never a
bare error later or a silently different run."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from topkast_jax import (
  magnitude_pruning,
  resolve_sparsities,
  rigl,
  set_sparse,
  static_sparse,
  topkast,
)
from topkast_jax.sparsity import is_dense

PARAMS = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}


def test_an_exploration_l2_array_must_be_a_scalar_at_build():
  with pytest.raises(ValueError, match=r'exploration_l2 must be a scalar.*shape \(2,\)'):
    topkast(optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.8, exploration_l2=jnp.ones(2))
  topkast(optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.8, exploration_l2=jnp.ones(()))


@pytest.mark.parametrize('name', ['compact_inner_state', 'reset_inner_state_on_exit'])
def test_switches_must_be_booleans(name):
  with pytest.raises(ValueError, match=f"{name} must be True or False, got 'False'"):
    topkast(optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.8, **{name: 'False'})
  with pytest.raises(ValueError, match='track_mask_changes must be True or False, got 1'):
    static_sparse(optax.sgd(0.1), sparsity_level=0.9, track_mask_changes=1)


def test_magnitude_pruning_must_reach_its_target_at_an_update():
  """Updates count from 1: end_step=0 would never prune."""
  with pytest.raises(ValueError, match=r'end_step must be in \[1, 2\*\*31\)'):
    magnitude_pruning(optax.sgd(0.1), sparsity_level=0.9, end_step=0)


def test_a_mask_update_interval_past_end_step_warns():
  with pytest.warns(UserWarning, match='update_every=100 > end_step=50, so the mask never'):
    set_sparse(optax.sgd(0.1), sparsity_level=0.9, end_step=50)


@pytest.mark.parametrize(
  'make',
  [
    lambda: rigl(optax.sgd(0.1), sparsity_level=0.5, end_step=10, update_every=1),
    lambda: topkast(optax.sgd(0.1), forward_sparsity=0.5, backward_sparsity=0.25),
  ],
  ids=['rigl', 'topkast'],
)
def test_gradients_must_match_the_params(make):
  tx = make()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"missing \['b'\]"):
    tx.update({'w': jnp.ones((8, 16))}, state, PARAMS)
  with pytest.raises(ValueError, match=r"gradient at 'w' has shape \(16, 8\).*shape \(8, 16\)"):
    tx.update({'w': jnp.ones((16, 8)), 'b': jnp.zeros(16)}, state, PARAMS)


def test_erk_with_an_empty_leaf_keeps_the_budget_of_the_others():
  params = {'a': jnp.zeros((64, 64)), 'b': jnp.zeros((256, 128)), 'empty': jnp.zeros((0, 5))}
  specs = resolve_sparsities(params, 0.9, 0.8, distribution='erk')
  assert is_dense(specs['empty'])
  kept = sum(
    specs[k].counts(int(np.prod(params[k].shape)))[0] for k in ('a', 'b') if not is_dense(specs[k])
  )
  assert kept == pytest.approx(0.1 * (64 * 64 + 256 * 128), rel=1e-3)  # not the whole model dense


def test_a_compact_state_from_another_sparsity_is_refused():
  def make(backward):
    return topkast(
      optax.adam(1e-3), forward_sparsity=0.9, backward_sparsity=backward, compact_inner_state=True
    )

  params = {'w': jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32)}
  state = make(0.8).init(params)
  make(0.8).update(params, state, params)  # its own settings: fine
  with pytest.raises(ValueError, match='made with another sparsity.*Re-run tx.init'):
    make(0.5).update(params, state, params)
  dense_state = topkast(optax.adam(1e-3), forward_sparsity=0.9, backward_sparsity=0.8).init(params)
  with pytest.raises(ValueError, match='does not have the shapes these settings need'):
    make(0.8).update(params, dense_state, params)
