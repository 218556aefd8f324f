"""ResNet v1.5 (He et al. 2016; stride on the 3x3 conv of bottleneck blocks) in Flax linen.

Parameter names are stable so sparsity overrides can address them: ``stem_conv``,
``stem_bn``, ``stage{s}_block{b}/{conv1,bn1,conv2,bn2[,conv3,bn3][,proj_conv,proj_bn]}`` and
``head``. BatchNorm statistics are averaged over ``bn_axis_name`` when it is set (pmap with
``axis_name='batch'``), so every replica holds the same statistics.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # He init for ReLU


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""

  features: int
  strides: int
  conv: Any
  norm: Any
  expansion: int = 1
  last_scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), self.strides, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), name='conv2')(y)
    y = self.norm(name='bn2', scale_init=self.last_scale_init)(y)
    return nn.relu(y + _shortcut(self, x, y.shape[-1]))


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4 (ResNet-50/101)."""

  features: int
  strides: int
  conv: Any
  norm: Any
  expansion: int = 4
  last_scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name='bn1')(self.conv(self.features, (1, 1), name='conv1')(x)))
    y = self.conv(self.features, (3, 3), self.strides, name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.features * 4, (1, 1), name='conv3')(y)
    y = self.norm(name='bn3', scale_init=self.last_scale_init)(y)
    return nn.relu(y + _shortcut(self, x, y.shape[-1]))


def _shortcut(block, x, features):
  """Identity, or a strided 1x1 projection with BatchNorm when the shape changes."""
  if x.shape[-1] == features and block.strides == 1:
    return x
  x = block.conv(features, (1, 1), block.strides, name='proj_conv')(x)
  return block.norm(name='proj_bn')(x)


class ResNet(nn.Module):
  """ResNet for images ``[batch, height, width, channels]``; returns logits.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    num_classes: outputs of the classifier ``head``.
    width: channels of the first stage (64 in the paper; 16 gives a quarter-width network).
    stem: ``'imagenet'`` (7x7 stride-2 conv and 3x3 stride-2 max-pool) or ``'small'`` (one
      3x3 stride-1 conv, no pool) for 28x28 and 32x32 inputs.
    zero_init_last_bn: start each block's last BatchNorm scale at zero (each residual branch
      starts as the identity; Goyal et al. 2017).
    bn_axis_name: pmap axis over which batch statistics are averaged (None: per device).
    bn_momentum: decay of the running statistics.
    dtype: computation dtype (bfloat16 for mixed precision); parameters stay float32.
  """

  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int = 1000
  width: int = 64
  stem: str = 'imagenet'
  zero_init_last_bn: bool = False
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.stem not in ('imagenet', 'small'):
      raise ValueError(f"stem must be 'imagenet' or 'small', got {self.stem!r}.")
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_KERNEL_INIT, dtype=self.dtype)
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=1e-5,
      dtype=self.dtype,
      axis_name=self.bn_axis_name if train else None,
    )
    last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones

    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    else:
      x = conv(self.width, (3, 3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    for s, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        strides = 2 if s > 0 and b == 0 else 1
        x = self.block_cls(
          self.width * 2**s,
          strides,
          conv,
          norm,
          last_scale_init=last_scale,
          name=f'stage{s + 1}_block{b + 1}',
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
ResNetTiny = functools.partial(
  ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, width=8, stem='small'
)  # for tests


def resnet_sparsity():
  """Top-KAST overrides for ResNets: the first conv and the classifier stay dense (the paper).

  Every other kernel is sparse by the default rule; biases and BatchNorm parameters are dense.
  """
  return {r'(^|/)stem_conv/kernel$': 0, r'(^|/)head/kernel$': 0}
