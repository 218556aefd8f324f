"""topkast_jax: Top-KAST sparse training (Jayakumar et al., NeurIPS 2020) for JAX, Flax and optax."""

from topkast_jax.metrics import topkast_metrics
from topkast_jax.sparsity import LeafSparsity, path_name, resolve_sparsities
from topkast_jax.topk import topk_mask, topk_masks
from topkast_jax.transform import (
  TopKastState,
  find_topkast_state,
  sparse_params,
  sparse_value_and_grad,
  topkast,
)

__version__ = '0.1.0'

__all__ = [
  'LeafSparsity',
  'TopKastState',
  'find_topkast_state',
  'path_name',
  'resolve_sparsities',
  'sparse_params',
  'sparse_value_and_grad',
  'topk_mask',
  'topk_masks',
  'topkast',
  'topkast_metrics',
]
