"""Flax models for the Top-KAST experiments."""

from topkast_jax import extras

extras.require(__name__, 'models', ['flax'])

from topkast_jax.models.adaptive import AdaptiveEmbedding, AdaptiveSoftmax
from topkast_jax.models.resnet import (
  ResNet,
  ResNet18,
  ResNet34,
  ResNet50,
  ResNet101,
  ResNetTiny,
  resnet_sparsity,
)
from topkast_jax.models.transformer_xl import (
  TransformerXL,
  rel_shift,
  sinusoidal_positions,
  transformer_xl_sparsity,
)

__all__ = [
  'AdaptiveEmbedding',
  'AdaptiveSoftmax',
  'ResNet',
  'ResNet18',
  'ResNet34',
  'ResNet50',
  'ResNet101',
  'ResNetTiny',
  'TransformerXL',
  'rel_shift',
  'resnet_sparsity',
  'sinusoidal_positions',
  'transformer_xl_sparsity',
]
