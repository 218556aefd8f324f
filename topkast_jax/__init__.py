"""topkast_jax: Top-KAST sparse training (Jayakumar et al., NeurIPS 2020) for JAX, Flax and optax,
with the methods it is compared with (static masks, SET, RigL, magnitude pruning, STE)."""

from topkast_jax import methods
from topkast_jax.baselines import magnitude_pruning, rigl, set_sparse, static_sparse, ste
from topkast_jax.engine import Policy, sparse_training
from topkast_jax.metrics import sparsity_metrics
from topkast_jax.regularizer import exploration_penalty
from topkast_jax.sparsity import (
  LeafSparsity,
  Stacked,
  Structured,
  path_name,
  resolve_sparsities,
  stacked,
  structured,
  where_structure_fits,
)
from topkast_jax.states import (
  SparseState,
  find_sparse_state,
  sparse_params,
  sparse_value_and_grad,
  unpack_masks,
)
from topkast_jax.structure import NM, Blocks
from topkast_jax.topk import topk_mask, topk_masks
from topkast_jax.transform import topkast

__version__ = '0.1.0'

__all__ = [
  'NM',
  'Blocks',
  'LeafSparsity',
  'Policy',
  'SparseState',
  'Stacked',
  'Structured',
  'exploration_penalty',
  'find_sparse_state',
  'magnitude_pruning',
  'methods',
  'path_name',
  'resolve_sparsities',
  'rigl',
  'set_sparse',
  'sparse_params',
  'sparse_training',
  'sparse_value_and_grad',
  'sparsity_metrics',
  'static_sparse',
  'stacked',
  'structured',
  'ste',
  'topk_mask',
  'topk_masks',
  'topkast',
  'unpack_masks',
  'where_structure_fits',
]
