"""Which leaves are sparse: default rule, overrides, ERK budget, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topkast_jax.sparsity import LeafSparsity, is_dense, path_name, resolve_sparsities


def cnn_params():
  return {
    'conv_init': {'kernel': jnp.zeros((3, 3, 3, 16)), 'bias': jnp.zeros(16)},
    'block': {
      'conv': {'kernel': jnp.zeros((3, 3, 16, 32))},
      'norm': {'scale': jnp.ones(32), 'bias': jnp.zeros(32)},
    },
    'head': {'kernel': jnp.zeros((32, 10)), 'bias': jnp.zeros(10)},
    'step': jnp.zeros((), jnp.int32),
  }


def spec_list(specs):
  """The spec tree's leaves in ``tree_leaves(params)`` order, None at dense leaves."""
  return [None if is_dense(s) else s for s in jax.tree.leaves(specs, is_leaf=is_dense)]


def by_leaf(params, specs):
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return {path_name(p): s for p, s in zip(paths, spec_list(specs))}


def test_default_rule_kernels_sparse_vectors_dense():
  params = cnn_params()
  specs = by_leaf(params, resolve_sparsities(params, 0.9, 0.8))
  sparse = {k for k, v in specs.items() if v is not None}
  assert sparse == {'conv_init/kernel', 'block/conv/kernel', 'head/kernel'}
  assert specs['head/kernel'] == LeafSparsity(0.9, 0.8)


def test_regex_overrides_keep_first_and_last_dense():
  params = cnn_params()
  specs = by_leaf(
    params,
    resolve_sparsities(
      params, 0.9, 0.8, sparsity={'conv_init': 0, r'^head/': False, 'block/conv': 0.95}
    ),
  )
  assert specs['conv_init/kernel'] is None and specs['head/kernel'] is None
  # A float keeps the global backward/forward density ratio (0.2 / 0.1 = 2).
  assert specs['block/conv/kernel'].forward == pytest.approx(0.95)
  assert specs['block/conv/kernel'].backward == pytest.approx(0.9)


def test_pair_and_callable_overrides():
  params = cnn_params()
  specs = by_leaf(params, resolve_sparsities(params, 0.8, 0.5, sparsity={'head': (0.6, 0.3)}))
  assert specs['head/kernel'] == LeafSparsity(0.6, 0.3)
  specs = by_leaf(
    params,
    resolve_sparsities(
      params, 0.8, 0.5, sparsity=lambda path, leaf: 'block' in path and leaf.ndim == 4
    ),
  )
  assert [k for k, v in specs.items() if v is not None] == ['block/conv/kernel']


def test_erk_keeps_global_budget_and_favours_small_layers():
  params = {
    'a': jnp.zeros((3, 3, 64, 64)),
    'b': jnp.zeros((3, 3, 128, 128)),
    'c': jnp.zeros((512, 1000)),
    'tiny': jnp.zeros((2, 3)),
  }
  density = 0.1
  uniform = spec_list(resolve_sparsities(params, 1 - density, 1 - 2 * density))
  erk = spec_list(resolve_sparsities(params, 1 - density, 1 - 2 * density, distribution='erk'))
  sizes = [np.prod(x.shape) for x in params.values()]
  budget = sum(s.counts(n)[0] for s, n in zip(uniform, sizes))
  erk_count = sum(n if s is None else s.counts(n)[0] for s, n in zip(erk, sizes))
  assert abs(erk_count - budget) <= len(sizes)  # equal up to per-leaf rounding
  # The tiny leaf would exceed density 1 under ERK, so it becomes dense.
  assert erk[3] is None
  densities = [s.forward_density for s in erk[:3]]
  assert densities[0] > densities[1] and densities[0] > density
  # Density ratios follow the ERK scores sum(shape) / prod(shape).
  scores = [sum(params[k].shape) / np.prod(params[k].shape) for k in 'abc']
  assert densities[0] / densities[2] == pytest.approx(scores[0] / scores[2])


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (
      dict(forward_sparsity=1.0, backward_sparsity=0.5),
      r'forward_sparsity must be in \[0, 1\), got 1.0',
    ),
    (dict(forward_sparsity=-0.1, backward_sparsity=0.0), r'forward_sparsity must be in \[0, 1\)'),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.9),
      r'backward_sparsity \(0.9\) must not exceed forward_sparsity \(0.8\)',
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, sparsity={'nothing_here': 0}),
      "'nothing_here' matches no parameter",
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, sparsity={'head': 'dense'}),
      "sparsity value for 'head/bias'",
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, sparsity={'head': (0.5, 0.7)}),
      r"backward_sparsity \(0.7\) must not exceed forward_sparsity \(0.5\) for 'head/bias'",
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, sparsity={'step': True}),
      "'step' has dtype int32 and cannot be sparse",
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, distribution='global'),
      "distribution must be 'uniform' or 'erk'",
    ),
    (
      dict(forward_sparsity=0.8, backward_sparsity=0.5, sparsity=[0.5]),
      'sparsity must be None, a mapping',
    ),
  ],
)
def test_bad_input(kwargs, message):
  with pytest.raises(ValueError, match=message):
    resolve_sparsities(cnn_params(), **kwargs)
