"""Structured sparsity (N:M groups, blocks) for every method: masks against a numpy reference
(ties included), exact per-group and per-block counts through training, A within B, per-leaf
structures, the errors, and sharded training equal to unsharded without a kernel all-gather."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from test_sharding import LAYOUTS, all_gathers, kernel_spec, mesh_of, put

from topkast_jax import (
  NM,
  Blocks,
  export,
  find_sparse_state,
  magnitude_pruning,
  resolve_sparsities,
  rigl,
  set_sparse,
  sparse_params,
  stacked,
  static_sparse,
  ste,
  structured,
  topkast,
  unpack_masks,
  where_structure_fits,
)


def tied(seed, shape, levels=4):
  """Small integers as floats: many equal magnitudes (and exact block sums of squares)."""
  return jnp.asarray(np.random.default_rng(seed).integers(-levels, levels + 1, shape), jnp.float32)


def reference_nm(x, n, m, axis):
  """Numpy: the top n |x| of each group of m along ``axis``, ties to the lower index."""
  moved = np.moveaxis(np.abs(np.asarray(x)), axis, -1)
  groups = moved.reshape(*moved.shape[:-1], -1, m)
  order = np.argsort(-groups, axis=-1, kind='stable')  # stable: equal keys keep index order
  keep = np.zeros(groups.shape, bool)
  np.put_along_axis(keep, order[..., :n], True, axis=-1)
  return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def reference_blocks(x, rows, cols, k, layer_axes=0):
  """Numpy: per layer, the k blocks with the largest sum of squares, ties to the lower block
  index (C order over the layer's blocks)."""
  x = np.asarray(x, np.float64)
  *lead, r, c = x.shape
  scores = (x.reshape(*lead, r // rows, rows, c // cols, cols) ** 2).sum(axis=(-3, -1))
  layers = scores.reshape(int(np.prod(lead[:layer_axes])), -1)
  keep = np.zeros(layers.shape, bool)
  for layer, row in zip(keep, layers):
    layer[np.argsort(-row, kind='stable')[:k]] = True
  blocks = keep.reshape(scores.shape)
  return np.repeat(np.repeat(blocks, rows, axis=-2), cols, axis=-1)


def masks(tx, params):
  state = find_sparse_state(tx.init(params))
  return unpack_masks(state.forward_mask), unpack_masks(state.backward_mask)


@pytest.mark.parametrize('n,m', [(2, 4), (1, 4), (1, 8)])
def test_topkast_nm_masks_equal_a_numpy_reference(n, m):
  params = {'dense': tied(0, (32, 24)), 'conv': tied(1, (3, 3, 16, 8)), 'stack': tied(2, (3, 8, 5))}
  density = n / m
  tx = topkast(
    optax.sgd(0.1),
    forward_sparsity=1 - density,
    backward_sparsity=1 - 2 * density,
    structure=NM(n, m),
    sparsity={'stack': stacked(NM(n, m, axis=0))},
  )
  forward, backward = masks(tx, params)
  for name, axis in (('dense', -2), ('conv', -2), ('stack', 1)):
    np.testing.assert_array_equal(forward[name], reference_nm(params[name], n, m, axis), name)
    np.testing.assert_array_equal(backward[name], reference_nm(params[name], 2 * n, m, axis))


def test_topkast_block_masks_equal_a_numpy_reference():
  params = {'dense': tied(3, (32, 24), levels=2), 'stack': tied(4, (3, 16, 12), levels=2)}
  tx = topkast(
    optax.sgd(0.1),
    forward_sparsity=0.75,
    backward_sparsity=0.5,
    structure=Blocks(4, 4),
    sparsity={'stack': stacked(structured(Blocks(2, 4)))},
  )
  forward, backward = masks(tx, params)
  # 48 blocks of 4 x 4: 12 and 24; each layer of the stack has 24 blocks of 2 x 4: 6 and 12.
  np.testing.assert_array_equal(forward['dense'], reference_blocks(params['dense'], 4, 4, 12))
  np.testing.assert_array_equal(backward['dense'], reference_blocks(params['dense'], 4, 4, 24))
  np.testing.assert_array_equal(forward['stack'], reference_blocks(params['stack'], 2, 4, 6, 1))
  np.testing.assert_array_equal(backward['stack'], reference_blocks(params['stack'], 2, 4, 12, 1))


def group_sums(mask, m):
  return np.asarray(mask).reshape(-1, m, mask.shape[-1]).sum(axis=1)


def block_sums(mask, rows, cols):
  r, c = mask.shape
  return np.asarray(mask).reshape(r // rows, rows, c // cols, cols).sum(axis=(1, 3))


def build(method, structure, sparsity_level):
  sgd = optax.sgd(0.5)
  drop_grow = dict(sparsity_level=sparsity_level, end_step=6, update_every=2, drop_fraction=0.5)
  return {
    'topkast': lambda: topkast(
      sgd,
      forward_sparsity=sparsity_level,
      backward_sparsity=sparsity_level / 2,
      exploration_l2=1e-3,
      structure=structure,
    ),
    'ste': lambda: ste(sgd, sparsity_level=sparsity_level, structure=structure),
    'static': lambda: static_sparse(sgd, sparsity_level=sparsity_level, structure=structure),
    'set': lambda: set_sparse(sgd, structure=structure, **drop_grow),
    'rigl': lambda: rigl(sgd, structure=structure, **drop_grow),
    'magnitude_pruning': lambda: magnitude_pruning(
      sgd, sparsity_level=sparsity_level, end_step=4, update_every=1, structure=structure
    ),
  }[method]()


def mlp_loss(params, x):
  return jnp.mean((jnp.tanh(x @ params['w1']) @ params['w2'] - 1.0) ** 2)


EVERY_METHOD = ['topkast', 'ste', 'static', 'set', 'rigl', 'magnitude_pruning']
COUNT_CASES = [(m, s) for s in (NM(2, 4), Blocks(4, 2)) for m in EVERY_METHOD] + [
  (m, NM(1, 8))
  for m in ('topkast', 'rigl', 'magnitude_pruning')  # n = 1: one per group
]


@pytest.mark.parametrize('method, structure', COUNT_CASES, ids=[f'{m}-{s}' for m, s in COUNT_CASES])
def test_every_method_keeps_exact_counts_in_every_group_and_block(method, structure):
  """Seven steps (SET and RigL change masks at 2, 4, 6; pruning reaches its target at 4): A
  within B; N:M: every group of A holds n (B: n_B); blocks: each block all in or all out, and
  A holds exactly its share of blocks."""
  level = 1 - structure.n / structure.m if isinstance(structure, NM) else 0.75
  tx = build(method, structure, level)
  rng = np.random.default_rng(0)
  params = {
    'w1': jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
    'w2': jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
  }
  state = tx.init(params)
  first = unpack_masks(find_sparse_state(state).forward_mask)
  step = jax.jit(
    lambda p, s, x: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.grad(mlp_loss)(sparse_params(p, s), x), s, p)
    )
  )
  for _ in range(7):
    params, state = step(params, state, jnp.asarray(rng.standard_normal((8, 32)), jnp.float32))
  sparse = find_sparse_state(state)
  forward, backward = unpack_masks(sparse.forward_mask), unpack_masks(sparse.backward_mask)
  changed = False
  for name in ('w1', 'w2'):
    a, b = np.asarray(forward[name]), np.asarray(backward[name])
    assert not (a & ~b).any(), name
    changed |= not np.array_equal(a, first[name])
    if isinstance(structure, NM):
      n_b = structure.m if method == 'ste' else int(np.floor((1 - level / 2) * structure.m + 0.5))
      assert (group_sums(a, structure.m) == structure.n).all(), name
      assert (
        group_sums(b, structure.m) == (n_b if method in ('topkast', 'ste') else structure.n)
      ).all()
    else:
      size = structure.rows * structure.cols
      for mask in (a, b):
        assert set(np.unique(block_sums(mask, structure.rows, structure.cols))) <= {0, size}
      assert a.sum() == round(0.25 * a.size / size) * size, name
  assert changed or method == 'static'  # the masks did move (pruning: from dense)


def test_a_structure_per_leaf_and_unstructured_under_a_global_one():
  params = {'a': jnp.ones((16, 8)), 'b': jnp.ones((16, 8)), 'c': jnp.ones((16, 8))}
  specs = resolve_sparsities(
    params,
    0.75,
    0.5,
    sparsity={'a': NM(1, 4), 'c': structured(None, 0.5)},
    structure=Blocks(2, 2),
  )
  assert specs['a'].structure == NM(1, 4) and specs['a'].layer_counts((16, 8)) == (32, 64)
  assert specs['b'].structure == Blocks(2, 2) and specs['b'].block_counts((16, 8)) == (8, 16)
  assert specs['c'].structure is None and specs['c'].layer_counts((16, 8)) == (64, 128)
  dense_head = resolve_sparsities(params, 0.75, 0.5, sparsity={'c': 0}, structure=NM(1, 4))
  assert isinstance(dense_head['c'], optax.MaskedNode) and dense_head['a'].structure == NM(1, 4)


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(structure=NM(2, 4), forward=0.5, shape=(30, 8)), r"'w'.*\(30, 8\).*size 30.*: 2, 3, 5"),
    (
      dict(structure=Blocks(4, 3), forward=0.9, shape=(16, 8)),
      r"'w'.*\(16, 8\).*divide 8: 2, 4, 8",
    ),
    (dict(structure=NM(2, 4), forward=0.9, shape=(16, 8)), r'forward_sparsity=0.5'),
    (dict(sparsity={'w': structured(NM(2, 4), 0.8)}, shape=(16, 8)), r'fixes the forward'),
    (dict(structure=NM(1, 4), forward=0.75, distribution='erk', shape=(16, 8)), r'uniform'),
    (dict(sparsity={'w': NM(1, 4, axis=2)}, shape=(16, 8)), r'needs a layer with that axis'),
  ],
)
def test_a_structure_that_does_not_fit_is_an_error_naming_the_leaf(kwargs, message):
  shape, forward = kwargs.pop('shape'), kwargs.pop('forward', 0.9)
  with pytest.raises(ValueError, match=message):
    resolve_sparsities({'w': jnp.ones(shape)}, forward, forward / 2, **kwargs)


def test_invalid_structures_are_refused():
  cases = [
    (lambda: NM(4, 4), 'n < m'),
    (lambda: Blocks(1, 1), 'unstructured'),
    (lambda: where_structure_fits(None), r'must be NM\(...\) or Blocks'),  # nothing to fit
  ]
  for make, message in cases:
    with pytest.raises(ValueError, match=message):
      make()


SHARDED = {
  'topkast-nm': ('topkast', NM(2, 4), 0.5),
  'rigl-nm': ('rigl', NM(1, 4), 0.75),
  'static-blocks': ('static', Blocks(8, 8), 0.9),
  'topkast-blocks': ('topkast', Blocks(8, 8), 0.9),
  'magnitude_pruning-blocks': ('magnitude_pruning', Blocks(8, 8), 0.9),
}


# Both layouts for the two Top-KAST cases; the baselines' selections are the same operations.
SHARDED_CASES = [(layout, case) for case in SHARDED for layout in LAYOUTS
                 if layout == 'fsdp' or case.startswith('topkast')]  # fmt: skip


@pytest.mark.parametrize('layout, case', SHARDED_CASES)
def test_structured_training_sharded_equals_unsharded(layout, case):
  """A (256, 128) kernel on 8 devices, sharded over its rows (FSDP) or its columns: every
  shard holds whole groups (32 rows: 8 groups of 4) and whole blocks; the same training as
  unsharded, and no all-gather larger than a row of counts."""
  method, structure, level = SHARDED[case]
  tx = build(method, structure, level)
  params = {'w': jax.random.normal(jax.random.key(0), (256, 128))}

  def step(params, state, x):
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(p['w'] * x)))(sparse_params(params, state))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  data = jax.random.normal(jax.random.key(1), (3, 256, 128))
  plain, state, jitted = params, tx.init(params), jax.jit(step)
  for x in data:
    plain, state = jitted(plain, state, x)
  mesh = mesh_of('explicit')
  with jax.set_mesh(mesh):
    sharded = put(params, mesh, kernel_spec(layout))
    sharded_state = jax.jit(tx.init)(sharded)
    xs = [jax.device_put(x, NamedSharding(mesh, LAYOUTS[layout])) for x in data]
    compiled = jitted.lower(sharded, sharded_state, xs[0]).compile()
    for x in xs:
      sharded, sharded_state = jax.block_until_ready(jitted(sharded, sharded_state, x))
  chex.assert_trees_all_equal(sharded, plain)
  chex.assert_trees_all_equal(sharded_state, state)
  assert sharded_state.forward_mask['w'].sharding.spec == LAYOUTS[layout]
  assert all(elements <= 256 for _, elements in all_gathers(compiled)), all_gathers(compiled)


@pytest.mark.parametrize(
  'structure, level, layout',
  [(NM(2, 4), 0.5, 'nm'), (NM(1, 8), 0.875, 'nm'), (Blocks(4, 2), 0.75, 'bcsr')],
  ids=['2:4', '1:8', 'blocks'],
)
def test_structured_export_round_trips_to_the_exact_forward_params(
  structure, level, layout, tmp_path
):
  rng = np.random.default_rng(3)
  params = {
    'dense': {'kernel': jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)},
    'conv': {'kernel': jnp.asarray(rng.standard_normal((3, 3, 8, 16)), jnp.float32)},
    'bias': jnp.ones(16),
  }
  tx = build('rigl', structure, level)
  state = tx.init(params)
  alpha = jax.device_get(sparse_params(params, state))
  path = str(tmp_path / 'model.npz')
  export.save_npz(path, params, state, structure=structure)
  chex.assert_trees_all_equal(export.load_npz(path, like=params), alpha)
  arrays = export.structured_arrays(params, state, structure)
  kernel = np.asarray(alpha['dense']['kernel'])
  if layout == 'nm':  # the input axis shrinks to n / m, every value is a kept one
    values, index = arrays['dense/kernel@nm_values'], arrays['dense/kernel@nm_index']
    assert values.shape == (32 * structure.n // structure.m, 16) and index.dtype == np.uint8
    rows = np.arange(32 // structure.m).repeat(structure.n)[:, None] * structure.m + index
    np.testing.assert_array_equal(kernel[rows, np.arange(16)], values)
  else:  # block CSR of the (rows, cols) tiles: each kept tile's values at its place
    data = arrays['dense/kernel@bcsr_data']
    indptr, indices = arrays['dense/kernel@bcsr_indptr'], arrays['dense/kernel@bcsr_indices']
    assert indptr[-1] == len(data) == round(0.25 * 32 * 16 / 8)
    for block_row in range(len(indptr) - 1):
      for j in range(indptr[block_row], indptr[block_row + 1]):
        r, c = block_row * 4, indices[j] * 2
        np.testing.assert_array_equal(kernel[r : r + 4, c : c + 2], data[j])


def test_structured_export_refuses_a_mask_without_the_structure():
  params = {'w': jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)), jnp.float32)}
  tx = topkast(optax.sgd(0.1), forward_sparsity=0.5, backward_sparsity=0.5)  # unstructured
  with pytest.raises(ValueError, match="mask of 'w' is not 2:4"):
    export.structured_arrays(params, tx.init(params), NM(2, 4))
  with pytest.raises(ValueError, match="mask of 'w' is not made of whole 4x4 blocks"):
    export.structured_arrays(params, tx.init(params), Blocks(4, 4))


@pytest.mark.parametrize('structure', [NM(2, 4), Blocks(4, 2)], ids=str)
def test_structured_compact_state_equals_reset_on_exit_bit_for_bit(structure):
  """B's vectors have the structured count (2:4 with B 3:4: 3/4 of each kernel)."""
  level = 0.5 if isinstance(structure, NM) else 0.75
  kwargs = dict(forward_sparsity=level, backward_sparsity=level / 2, structure=structure)
  reset = topkast(optax.adam(0.2), reset_inner_state_on_exit=True, **kwargs)
  compact = topkast(optax.adam(0.2), compact_inner_state=True, **kwargs)
  rng = np.random.default_rng(1)
  params = {
    'w1': jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
    'w2': jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
  }

  def make_step(tx):
    def step(p, s, x):
      updates, s = tx.update(jax.grad(mlp_loss)(sparse_params(p, s), x), s, p)
      return optax.apply_updates(p, updates), s

    return jax.jit(step)

  runs = [(params, tx.init(params), make_step(tx)) for tx in (reset, compact)]
  size_b = 32 * 16 * (3 / 4 if isinstance(structure, NM) else 0.5)
  assert runs[1][1].inner_state[0].mu['w1'].size >= size_b  # B's slots (padded)
  first_b = runs[1][1].backward_mask
  for _ in range(5):
    x = jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)
    runs = [(*step(p, s, x), step) for p, s, step in runs]
    chex.assert_trees_all_equal(runs[0][0], runs[1][0])
    chex.assert_trees_all_equal(runs[0][1].backward_mask, runs[1][1].backward_mask)
  changed = jax.tree.map(lambda a, b: bool((a != b).any()), first_b, runs[1][1].backward_mask)
  assert any(jax.tree.leaves(changed)), 'the test needs B to change'


def test_the_driver_builds_every_method_with_a_structure_from_its_config():
  """``config.sparsity.structure`` ('2:4', '4x4', 'none') reaches every method of the driver
  (`training.methods.build`); a malformed one is a ValueError naming config.sparsity."""
  import configs.resnet_fashion_mnist as base
  from topkast_jax.training import methods as training_methods

  params = {
    'a': {'kernel': jnp.ones((16, 8))},
    'b': {'kernel': jnp.ones((8, 4)), 'bias': jnp.ones(4)},
  }
  for method in ('topkast', 'static', 'rigl', 'set', 'magnitude_pruning', 'ste'):
    config = base.get_config()
    config.method, config.sparsity.structure = method, '2:4'
    config.sparsity.forward, config.sparsity.backward = 0.5, 0.25
    built = training_methods.build(config, 0.1, params, total_steps=1000)
    forward = unpack_masks(find_sparse_state(built.tx.init(params)).forward_mask)
    if method != 'magnitude_pruning':  # dense at init
      assert (group_sums(np.asarray(forward['a']['kernel']), 4) == 2).all(), method
  config = base.get_config()
  config.sparsity.structure = '2by4'
  with pytest.raises(ValueError, match=r"config.sparsity: structure '2by4' is not"):
    training_methods.check(config)
