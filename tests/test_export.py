"""Sparse export: BCOO and .npz forms hold exactly A, load back to the exact alpha, and run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import sparse

import topkast_jax
from topkast_jax import export, unpack_masks


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    # jnp.maximum, not nn.relu: sparse.sparsify cannot trace relu's custom_jvp (jax 0.10).
    return nn.Dense(10, name='head')(jnp.maximum(nn.Dense(64, name='hidden')(x), 0.0))


def trained(forward=0.9):
  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 32)))['params']
  tx = topkast_jax.topkast(
    optax.sgd(0.1, momentum=0.9), forward_sparsity=forward, backward_sparsity=0.5, update_every=1
  )
  state = tx.init(params)
  x = jax.random.normal(jax.random.key(1), (16, 32))
  y = jnp.arange(16) % 10

  def loss_fn(p):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  for _ in range(3):
    _, grads = topkast_jax.sparse_value_and_grad(loss_fn)(params, state)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return model, params, state, x


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_holds_exactly_a_and_densifies_to_alpha():
  model, params, state, x = trained()
  alpha = topkast_jax.sparse_params(params, state)
  exported = export.export_sparse(params, state)
  kernel = exported['hidden']['kernel']
  assert isinstance(kernel, sparse.BCOO)
  assert (
    kernel.nse
    == int(np.sum(unpack_masks(state.forward_mask)['hidden']['kernel']))
    == round(0.1 * 32 * 64)
  )
  assert isinstance(exported['hidden']['bias'], jax.Array)  # dense leaves stay arrays
  assert_trees_equal(export.densify(exported), alpha)
  logits = model.apply({'params': alpha}, x)
  sparse_logits = sparse.sparsify(model.apply)({'params': exported}, x)  # BCOO matmuls
  np.testing.assert_allclose(sparse_logits, logits, rtol=1e-5, atol=1e-6)


def test_npz_round_trip_is_exact_and_small(tmp_path):
  _, params, state, _ = trained(forward=0.95)
  alpha = topkast_jax.sparse_params(params, state)
  path = str(tmp_path / 'model.npz')
  export.save_npz(path, params, state)
  assert_trees_equal(export.load_npz(path, like=params), alpha)
  assert_trees_equal(export.load_npz(path), jax.device_get(alpha))  # nested dicts by path
  arrays = dict(np.load(path))
  assert arrays['hidden/kernel@indices'].dtype == np.int32
  assert arrays['hidden/kernel@values'].size == round(0.05 * 32 * 64)
  dense_path = str(tmp_path / 'dense.npz')
  np.savez(dense_path, **{'/'.join(k): v for k, v in _flat(jax.device_get(params))})
  assert (tmp_path / 'model.npz').stat().st_size < 0.5 * (tmp_path / 'dense.npz').stat().st_size


def _flat(tree, prefix=()):
  for k, v in tree.items():
    yield from _flat(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]


def test_nnx_params_export_by_plain_paths():
  model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  tx = topkast_jax.topkast(optax.sgd(0.1), forward_sparsity=0.75, backward_sparsity=0.5)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  arrays = export.to_arrays(export.export_sparse(params, optimizer.opt_state))
  assert 'layers/0/kernel@values' in arrays and 'layers/0/bias' in arrays
  loaded = export.from_arrays(arrays, like=params)
  alpha = topkast_jax.sparse_params(params, optimizer.opt_state)
  assert_trees_equal(loaded, alpha)


def test_export_bad_input():
  _, params, state, _ = trained()
  with pytest.raises(ValueError, match='exactly one sparse-training state'):
    export.export_sparse(params, optax.sgd(0.1).init(params))
  dense_state = topkast_jax.topkast(
    optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.5, sparsity=lambda path, leaf: False
  ).init(params)
  with pytest.raises(ValueError, match='holds no masks'):
    export.export_sparse(params, dense_state)
  with pytest.raises(ValueError, match='structure of the params'):
    export.export_sparse({'other': jnp.ones((3, 3))}, state)
  arrays = export.to_arrays(export.export_sparse(params, state))
  with pytest.raises(ValueError, match="no parameter at \\['extra/kernel'\\]"):
    export.from_arrays(arrays, like={**params, 'extra': {'kernel': jnp.ones((2, 2))}})


def test_export_refuses_keys_that_would_lose_a_leaf_and_damaged_files(tmp_path):
  """Keys with '@', or two paths that name one key, are refused instead of one leaf silently
  overwriting the other; a file with valid CRCs but damaged indices or other shapes than
  ``like`` is refused when loaded."""
  tx = topkast_jax.topkast(optax.sgd(0.1), forward_sparsity=0.5, backward_sparsity=0.5)
  for params in ({'a@values': jnp.ones((4, 4))}, {'a/b': jnp.ones((4, 4)), 'a': {'b': jnp.ones((4, 4))}}):  # fmt: skip
    with pytest.raises(ValueError, match='would lose one of them'):
      export.save_npz(str(tmp_path / 'x.npz'), params, tx.init(params))
  params = {'w': jnp.arange(1.0, 17.0).reshape(4, 4)}
  arrays = export.to_arrays(export.export_sparse(params, tx.init(params)))
  for bad in (np.array([-1, 3, 5, 7, 9, 11, 13, 15]), np.array([8, 9, 9, 11, 12, 13, 14, 15])):
    with pytest.raises(ValueError, match="export of 'w' is damaged"):
      export.from_arrays({**arrays, 'w@indices': bad.astype(np.int32)})
  with pytest.raises(ValueError, match=r"'w' has shape \(4, 4\), `like` has \(2, 8\)"):
    export.from_arrays(arrays, like={'w': jnp.zeros((2, 8))})
