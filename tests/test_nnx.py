"""Flax NNX: topkast, sparse_params, overrides and metrics with nnx.Optimizer, equal to linen."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import topkast_jax
from topkast_jax import unpack_masks


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(12, 10, rngs=rngs)
    self.out = nnx.Linear(10, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name='out')(jnp.tanh(nn.Dense(10, name='hidden')(x)))


def make_tx():
  return topkast_jax.topkast(
    optax.adam(1e-2),
    forward_sparsity=0.8,
    backward_sparsity=0.5,
    update_every=2,
    exploration_l2=1e-3,
    sparsity={r'hidden/kernel$': (0.7, 0.4), r'out/kernel$': 0.9},  # '$' as for linen paths
  )


def data(steps=4):
  rng = np.random.default_rng(0)
  return [
    (rng.standard_normal((16, 12), np.float32), rng.standard_normal((16, 4), np.float32))
    for _ in range(steps)
  ]


def mse(prediction, y):
  return jnp.mean((prediction - y) ** 2)


@nnx.jit
def nnx_step(model, optimizer, x, y):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss_fn = lambda p: mse(nnx.merge(graphdef, p, rest)(x), y)  # noqa: E731
  loss, grads = topkast_jax.sparse_value_and_grad(loss_fn)(params, optimizer.opt_state)
  optimizer.update(model, grads)
  return loss


def test_nnx_and_linen_give_the_same_masks_updates_and_metrics():
  model = NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # the same weights for linen
  linen, tx = LinenMLP(), make_tx()
  opt_state = tx.init(params)

  @jax.jit
  def linen_step(params, opt_state, x, y):
    loss_fn = lambda p: mse(linen.apply({'params': p}, x), y)  # noqa: E731
    loss, grads = topkast_jax.sparse_value_and_grad(loss_fn)(params, opt_state)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for x, y in data():
    nnx_loss = nnx_step(model, optimizer, x, y)
    params, opt_state, linen_loss = linen_step(params, opt_state, x, y)
    np.testing.assert_allclose(nnx_loss, linen_loss, rtol=1e-6)
  nnx_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), nnx_params, params)
  state = topkast_jax.find_sparse_state(optimizer.opt_state)
  for layer, density in (('hidden', 0.3), ('out', 0.1)):
    nnx_mask = np.asarray(unpack_masks(state.forward_mask)[layer]['kernel'][...])
    linen_mask = np.asarray(unpack_masks(opt_state.forward_mask)[layer]['kernel'])
    np.testing.assert_array_equal(nnx_mask, linen_mask)
    assert nnx_mask.mean() == pytest.approx(density, abs=0.01)
  nnx_metrics = topkast_jax.sparsity_metrics(optimizer.opt_state)
  linen_metrics = topkast_jax.sparsity_metrics(opt_state)
  assert set(nnx_metrics) == set(linen_metrics) and 'hidden/kernel/forward_density' in nnx_metrics
  for k in linen_metrics:
    np.testing.assert_allclose(nnx_metrics[k], linen_metrics[k], rtol=1e-6)

  sparse = topkast_jax.sparse_params(nnx.state(model, nnx.Param), optimizer.opt_state)
  assert isinstance(sparse, nnx.State)  # shaped like the params given
  zeros = np.asarray(sparse['hidden']['kernel'][...]) == 0
  np.testing.assert_array_equal(
    zeros, ~np.asarray(unpack_masks(state.forward_mask)['hidden']['kernel'][...])
  )


class WithCounter(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)
    self.table = nnx.Param(jnp.zeros((3, 3), jnp.int32))


def test_nnx_int_parameter_gets_a_clear_error():
  model = WithCounter(nnx.Rngs(0))
  with pytest.raises(ValueError, match="'table' has dtype int32 and cannot be sparse"):
    nnx.Optimizer(model, tx_all(), wrt=nnx.Param)


def tx_all():
  return topkast_jax.topkast(optax.sgd(0.1), forward_sparsity=0.5, backward_sparsity=0.0)
