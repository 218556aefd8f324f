"""Boolean masks stored as bits: 8 weights per byte (uint8), packed along the last axis.

Packing keeps every leading axis, so a packed mask shards like the weights it covers. A mask
whose last axis is not a multiple of 8 stays a bool array: the dtype tells the two apart, and
a packed mask of shape ``(..., m)`` covers weights of shape ``(..., 8 m)``. Masks stay plain
arrays (no custom pytree node), so every state container (optax, Flax NNX, orbax) holds them.
"""

import jax
import jax.numpy as jnp
import numpy as np

_BIT = np.arange(8, dtype=np.uint8)


def pack(mask: jax.Array) -> jax.Array:
  """uint8 bits of a bool ``mask`` whose last axis is a multiple of 8; else ``mask`` as is."""
  if mask.ndim == 0 or mask.shape[-1] % 8:
    return mask
  eighths = mask.reshape(*mask.shape[:-1], -1, 8).astype(jnp.uint8) << _BIT
  return jnp.sum(eighths, axis=-1, dtype=jnp.uint8)


def unpack(mask: jax.Array) -> jax.Array:
  """The bool mask of ``pack``'s result (leading axes, such as pmap's replicas, are kept)."""
  if mask.dtype != jnp.uint8:
    return mask
  bits = (mask[..., None] >> _BIT) & 1
  return bits.reshape(*mask.shape[:-1], -1).astype(bool)


def count(mask: jax.Array) -> jax.Array:
  """Number of True entries of a packed or bool mask (int32). A bool mask is counted through
  its packed bits where its last axis allows: on XLA's CPU backend a compare-and-pack then a
  popcount vectorises, a sum of bools does not (0.07 ms against 0.19 ms over 784 x 512)."""
  mask = pack(mask) if mask.dtype == jnp.bool_ else mask
  if mask.dtype != jnp.uint8:
    return jnp.sum(mask, dtype=jnp.int32)
  return jnp.sum(jax.lax.population_count(mask), dtype=jnp.int32)


def size(mask: jax.Array) -> int:
  """Number of weights a packed or bool mask covers."""
  return mask.size * (8 if mask.dtype == jnp.uint8 else 1)


def shape(mask: jax.Array) -> tuple[int, ...]:
  """Shape of the weights a packed or bool mask covers."""
  if mask.dtype != jnp.uint8:
    return tuple(mask.shape)
  return (*mask.shape[:-1], mask.shape[-1] * 8)
