"""Top-KAST on parameters sharded with NamedSharding (8 fake CPU devices): FSDP and tensor-
parallel layouts, explicit and automatic meshes, equal to the unsharded run; the refresh's
compiled HLO has no all-gather of a kernel; optax's state tools work on the state."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import topkast_jax
from topkast_jax import sparse_params, topk_masks, topkast

LAYOUTS = {'fsdp': P('x', None), 'tensor_parallel': P(None, 'x')}
SHAPE = (256, 128)


def mesh_of(kind):
  return jax.make_mesh((8,), ('x',), axis_types=(getattr(AxisType, kind.capitalize()),))


def put(tree, mesh, spec_of):
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_of(x))), tree)


def kernel_spec(layout):
  return lambda x: LAYOUTS[layout] if x.ndim == 2 else P()


def all_gathers(compiled) -> list[tuple[str, int]]:
  """(dtype, elements) of every all-gather or all-to-all in compiled HLO."""
  found = re.findall(
    r'= (\w+)\[([\d,]*)\][^ ]* (?:all-gather|all-to-all)(?:-start)?\(', compiled.as_text()
  )
  return [(dtype, int(np.prod([int(d) for d in dims.split(',') if d]))) for dtype, dims in found]


def collective_count(compiled) -> int:
  ops = r'all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute'
  return len(re.findall(rf'= \S+ (?:{ops})(?:-start)?\(', compiled.as_text()))


def tied_kernel(seed=0, shape=SHAPE):
  """Normal weights rounded to 1/16: many equal magnitudes, ties across the top-k cut."""
  return jnp.round(jax.random.normal(jax.random.key(seed), shape) * 16) / 16


@pytest.mark.parametrize('kind', ['explicit', 'auto'])
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_topk_masks_of_a_sharded_leaf_equal_unsharded(kind, layout):
  ks = [1000, 9000]
  kernels = {'2d': (tied_kernel(), LAYOUTS[layout])}
  conv_spec = P(None, None, 'x', None) if layout == 'fsdp' else P(None, None, None, 'x')
  kernels['conv'] = (tied_kernel(1, (3, 3, 16, 64)), conv_spec)
  mesh = mesh_of(kind)
  for name, (x, spec) in kernels.items():
    expected = topk_masks(x, ks)
    with jax.set_mesh(mesh):
      sharded = jax.device_put(x, NamedSharding(mesh, spec))
      masks = jax.jit(lambda x: topk_masks(x, ks))(sharded)
    for mask, want in zip(masks, expected):
      np.testing.assert_array_equal(mask, want, err_msg=name)
      assert mask.sharding.spec == spec or kind == 'auto', name  # masks sharded like the leaf


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {'w': jax.random.normal(k1, SHAPE), 'b': jnp.zeros(SHAPE[1]), 'v': tied_kernel(2)}


def loss(params, x):
  """Elementwise in the weights, so sharded and unsharded gradients agree bit for bit."""
  return jnp.sum(jnp.sin(params['w'] * x) + params['v'] ** 2 * x) + jnp.sum(params['b'])


def make_tx(compact):
  return topkast(
    optax.adam(0.05),
    forward_sparsity=0.9,
    backward_sparsity=0.8,
    exploration_l2=1e-3,
    compact_inner_state=compact,
  )


def make_step(tx):
  def step(params, state, x):
    grads = jax.grad(loss)(sparse_params(params, state), x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def without_penalty(state):
  """The penalty is a sum, whose order a sharded reduction may change: compared apart."""
  return state._replace(penalty=None)


@pytest.mark.parametrize('compact', [False, True], ids=['dense_state', 'compact_state'])
@pytest.mark.parametrize('kind', ['explicit', 'auto'])
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_sharded_training_equals_unsharded(layout, kind, compact):
  tx = make_tx(compact)
  step = make_step(tx)
  data = jax.random.normal(jax.random.key(3), (3, *SHAPE))
  params, state = init_params(), tx.init(init_params())
  for x in data:
    params, state = jax.jit(step)(params, state, x)
  mesh = mesh_of(kind)
  with jax.set_mesh(mesh):
    sharded = put(init_params(), mesh, kernel_spec(layout))
    sharded_state = jax.jit(tx.init)(sharded)
    for x in data:  # one step at a time: XLA:CPU's fake devices (examples/sharded_step.py)
      sharded, sharded_state = jax.block_until_ready(jax.jit(step)(sharded, sharded_state, x))
  chex.assert_trees_all_equal(sharded, params)
  chex.assert_trees_all_equal(without_penalty(sharded_state), without_penalty(state))
  chex.assert_trees_all_close(sharded_state.penalty, state.penalty, rtol=1e-5)
  assert sharded['w'].sharding.spec == LAYOUTS[layout] or kind == 'auto'
  if kind == 'explicit':  # the state is sharded too: masks like their kernels, B's vectors
    mask = sharded_state.forward_mask['w']
    assert mask.sharding.spec == LAYOUTS[layout] and mask.dtype == jnp.uint8
    if compact:
      assert sharded_state.inner_state[0].mu['w'].sharding.spec == P('x')


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_refresh_never_all_gathers_a_kernel(layout):
  """Only row counts and histograms cross devices: every all-gather is at most one row of
  counts (a kernel has 32768 entries); the dense step for comparison has none."""
  mesh = mesh_of('explicit')
  with jax.set_mesh(mesh):
    params = put(init_params(), mesh, kernel_spec(layout))
    x = jax.device_put(jnp.ones(SHAPE), NamedSharding(mesh, LAYOUTS[layout]))
    tx = make_tx(compact=False)
    state = jax.jit(tx.init)(params)
    sparse_step = jax.jit(make_step(tx)).lower(params, state, x).compile()
    adam = optax.adam(0.05)

    def dense_step(params, state, x):
      updates, state = adam.update(jax.grad(loss)(params, x), state, params)
      return optax.apply_updates(params, updates), state

    dense = jax.jit(dense_step).lower(params, jax.jit(adam.init)(params), x).compile()
  gathered = all_gathers(sparse_step)
  assert all(elements <= max(SHAPE) for _, elements in gathered), gathered
  assert all_gathers(dense) == []
  assert collective_count(sparse_step) > collective_count(dense)


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_compact_state_gathers_no_kernel(layout):
  """The compact path moves B's vectors (|B| = 6554 of 32768 weights per kernel, 6592 slots),
  their coordinates (two per slot), packed mask bits and block counts, never a kernel."""
  mesh = mesh_of('explicit')
  with jax.set_mesh(mesh):
    params = put(init_params(), mesh, kernel_spec(layout))
    x = jax.device_put(jnp.ones(SHAPE), NamedSharding(mesh, LAYOUTS[layout]))
    tx = make_tx(compact=True)
    compiled = jax.jit(make_step(tx)).lower(params, jax.jit(tx.init)(params), x).compile()
  gathered = all_gathers(compiled)
  assert all(elements <= 2 * 6592 for _, elements in gathered), gathered
  assert all(dtype != 'f32' or elements <= 6592 for dtype, elements in gathered), gathered


@pytest.mark.parametrize('compact', [False, True], ids=['dense_state', 'compact_state'])
def test_optax_state_tools(compact):
  tx = make_tx(compact)
  params = init_params()
  state = tx.init(params)
  shapes = jax.eval_shape(tx.init, params)  # nothing allocated
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, state)
  mu = optax.tree_utils.tree_get(state, 'mu')
  assert set(mu) == {'w', 'b', 'v'}
  size_b = state.inner_state[0].mu['w'].shape
  assert size_b == ((6592,) if compact else SHAPE)  # |B| = 6554 in 6592 slots (64 x 103)
  # Map over the inner state's per-parameter leaves (mu, nu): here, cast them to bfloat16.
  cast = optax.tree_utils.tree_map_params(
    tx, lambda p: p.astype(jnp.bfloat16), state, transform_non_params=lambda x: x
  )
  assert cast.inner_state[0].mu['w'].dtype == jnp.bfloat16
  assert cast.inner_state[0].count.dtype == jnp.int32  # not per-parameter: left as is


def test_state_shardings_follow_the_params_shardings():
  """The README's recipe: under an explicit mesh, eval_shape of init on sharded params gives
  every state leaf's sharding, to hand to jit (out_shardings) or a checkpoint restore."""
  mesh = mesh_of('explicit')
  tx = make_tx(compact=True)
  with jax.set_mesh(mesh):
    params = put(init_params(), mesh, kernel_spec('fsdp'))
    shardings = jax.tree.map(lambda s: s.sharding, jax.eval_shape(tx.init, params))
    state = jax.jit(tx.init, out_shardings=shardings)(params)
  assert shardings.forward_mask['w'].spec == P('x', None)
  assert shardings.inner_state[0].mu['w'].spec == P('x')
  assert shardings.inner_state[0].mu['b'].spec == P(None)
  assert state.inner_state[0].nu['w'].sharding.spec == P('x')
  used = topkast_jax.unpack_masks(state.forward_mask)['w']
  assert int(jnp.sum(used)) == round(0.1 * SHAPE[0] * SHAPE[1])
