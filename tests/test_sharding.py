"""Every sparse method on parameters sharded with NamedSharding (8 fake CPU devices): FSDP and
tensor-parallel layouts, explicit and automatic meshes, equal to the unsharded run; the mask
change's compiled HLO has no all-gather of a kernel; optax's state tools work on the state."""

import functools
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
from topkast_jax import (
  magnitude_pruning,
  rigl,
  set_sparse,
  sparse_params,
  stacked,
  static_sparse,
  ste,
  topk_masks,
  topkast,
)

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


METHODS = {  # each changes its masks at every one of the test's steps
  'topkast': lambda inner, **kw: topkast(
    inner, forward_sparsity=0.9, backward_sparsity=0.8, exploration_l2=1e-3, **kw
  ),
  'static': lambda inner, **kw: static_sparse(inner, sparsity_level=0.9, **kw),
  'set': lambda inner, **kw: set_sparse(
    inner, sparsity_level=0.9, end_step=10, update_every=1, drop_fraction=0.3, **kw
  ),
  'rigl': lambda inner, **kw: rigl(
    inner, sparsity_level=0.9, end_step=10, update_every=1, drop_fraction=0.3, **kw
  ),
  'magnitude_pruning': lambda inner, **kw: magnitude_pruning(
    inner, sparsity_level=0.9, end_step=2, update_every=1, **kw
  ),
  'ste': lambda inner, **kw: ste(inner, sparsity_level=0.9, **kw),
}
COMPACT = ('topkast', 'static', 'set', 'rigl')  # a fixed number of trained weights
CASES = [(m, c) for m in METHODS for c in (False, True) if not c or m in COMPACT]


def make_tx(compact, method='topkast', **kw):
  if compact:
    kw['compact_inner_state'] = True
  return METHODS[method](optax.adam(0.05), **kw)


def make_step(tx):
  def step(params, state, x):
    grads = jax.grad(loss)(sparse_params(params, state), x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


@functools.cache
def unsharded_training(method, compact):
  """The batches, and params and state after a step on each on one device (shared by the four
  layouts)."""
  tx = make_tx(compact, method)
  data = jax.random.normal(jax.random.key(3), (3, *SHAPE))
  params, state, step = init_params(), tx.init(init_params()), jax.jit(make_step(tx))
  for x in data:
    params, state = step(params, state, x)
  return data, params, state


@pytest.mark.parametrize('method,compact', CASES, ids=[f'{m}-{int(c)}' for m, c in CASES])
@pytest.mark.parametrize('kind', ['explicit', 'auto'])
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_sharded_training_equals_unsharded(layout, kind, method, compact):
  tx = make_tx(compact, method)
  step = jax.jit(make_step(tx))
  data, params, state = unsharded_training(method, compact)
  mesh = mesh_of(kind)
  with jax.set_mesh(mesh):
    sharded = put(init_params(), mesh, kernel_spec(layout))
    sharded_state = jax.jit(tx.init)(sharded)
    for x in data:  # one step at a time: XLA:CPU's fake devices (examples/sharded_step.py)
      sharded, sharded_state = jax.block_until_ready(step(sharded, sharded_state, x))
  chex.assert_trees_all_equal(sharded, params)
  chex.assert_trees_all_equal(sharded_state, state)
  assert sharded['w'].sharding.spec == LAYOUTS[layout] or kind == 'auto'
  if kind == 'explicit':  # the state is sharded too: masks like their kernels, B's vectors
    mask = sharded_state.forward_mask['w']
    assert mask.sharding.spec == LAYOUTS[layout] and mask.dtype == jnp.uint8
    if compact:
      assert sharded_state.inner_state[0].mu['w'].sharding.spec == P('x')


@pytest.mark.parametrize('method', list(METHODS))
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_mask_change_never_all_gathers_a_kernel(layout, method):
  """Only row counts and histograms cross devices: every all-gather is at most one row of
  counts (a kernel has 32768 entries); the dense step for comparison has none."""
  mesh = mesh_of('explicit')
  with jax.set_mesh(mesh):
    params = put(init_params(), mesh, kernel_spec(layout))
    x = jax.device_put(jnp.ones(SHAPE), NamedSharding(mesh, LAYOUTS[layout]))
    tx = make_tx(False, method)
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
  if method != 'static':  # a static mask never changes: nothing to select
    assert collective_count(sparse_step) > collective_count(dense)


@pytest.mark.parametrize('method', COMPACT)
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_compact_state_gathers_no_kernel(layout, method):
  """The compact path moves B's vectors (Top-KAST: |B| = 6554 of 32768 weights per kernel in
  6592 slots; the baselines: |A| = 3277 in 3296), their coordinates (two per slot), packed
  mask bits and block counts, never a kernel."""
  mesh = mesh_of('explicit')
  with jax.set_mesh(mesh):
    params = put(init_params(), mesh, kernel_spec(layout))
    x = jax.device_put(jnp.ones(SHAPE), NamedSharding(mesh, LAYOUTS[layout]))
    tx = make_tx(True, method)
    compiled = jax.jit(make_step(tx)).lower(params, jax.jit(tx.init)(params), x).compile()
  slots = 6592 if method == 'topkast' else 3296
  gathered = all_gathers(compiled)
  assert all(elements <= 2 * slots for _, elements in gathered), gathered
  assert all(dtype != 'f32' or elements <= slots for dtype, elements in gathered), gathered


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
  """The sharding guide's recipe: under an explicit mesh, eval_shape of init on sharded params gives
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


@pytest.mark.parametrize('method,compact', [('topkast', False), ('topkast', True), ('set', True)])
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_init_on_an_automatic_mesh_shards_the_state_like_the_params(layout, method, compact):
  """``tx.init`` on params sharded over automatic axes: the wrapped optimizer's moments are
  sharded like their params (or B's vectors over the kernel's axes), as plain optax's eager init
  keeps them, not replicated; the values equal the unsharded init."""
  tx = make_tx(compact, method)
  mesh = mesh_of('auto')
  state = tx.init(put(init_params(), mesh, kernel_spec(layout)))
  chex.assert_trees_all_equal(state, tx.init(init_params()))
  mu = state.inner_state[0].mu

  def sharded_as(x, spec):
    return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)

  assert sharded_as(mu['w'], P('x') if compact else LAYOUTS[layout])
  assert sharded_as(state.forward_mask['w'], LAYOUTS[layout])
  assert sharded_as(mu['b'], P()) and sharded_as(state.count, P())


@pytest.mark.parametrize('method', ['topkast', 'rigl'])
@pytest.mark.parametrize('spec', [P('x', None, None), P(None, 'x', None)], ids=['layers', 'rows'])
def test_stacked_layers_sharded_equal_unsharded(spec, method):
  """A (8, 64, 32) stack of layers with scales 1 ... 1e-7, selected per layer, sharded over
  its layer axis or its rows on an explicit mesh: the same training as unsharded, and every
  layer keeps exactly its own share."""
  scales = 10.0 ** -jnp.arange(8.0)
  stack = jax.random.normal(jax.random.key(5), (8, 64, 32)) * scales[:, None, None]
  params = {'w': stack, 'b': jnp.zeros((8, 32))}
  tx = make_tx(False, method, sparsity={'w|b': stacked()})

  def stack_loss(params, x):
    return jnp.sum(jnp.sin(params['w'] * x)) + jnp.sum(params['b'])

  def step(params, state, x):
    grads = jax.grad(stack_loss)(sparse_params(params, state), x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  data = jax.random.normal(jax.random.key(6), (2, 8, 64, 32))
  plain, state, step = params, tx.init(params), jax.jit(step)
  for x in data:
    plain, state = step(plain, state, x)
  mesh = mesh_of('explicit')
  with jax.set_mesh(mesh):
    sharded = put(params, mesh, lambda x: spec if x.ndim == 3 else P())
    sharded_state = jax.jit(tx.init)(sharded)
    for x in data:
      sharded, sharded_state = jax.block_until_ready(step(sharded, sharded_state, x))
  chex.assert_trees_all_equal(sharded, plain)
  chex.assert_trees_all_equal(sharded_state, state)
  used = topkast_jax.unpack_masks(sharded_state.forward_mask)['w']
  np.testing.assert_array_equal(jnp.sum(used, axis=(1, 2)), [round(0.1 * 64 * 32)] * 8)
  assert sharded_state.forward_mask['w'].sharding.spec == spec
