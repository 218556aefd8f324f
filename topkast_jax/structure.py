"""Structured masks: N:M groups and blocks, what fits a layer, and the top weights within them.

* `NM` ``(n, m)``: of every ``m`` consecutive weights along one axis of a layer (by default
  axis -2, the input axis of a Flax ``Dense`` (in, out) or ``Conv`` (h, w, in, out) kernel: the
  contraction axis, as sparse tensor cores need it), a mask keeps exactly ``n``. The top ``n``
  of a group by key, ties to the lowest index.
* `Blocks` ``(rows, cols)``: a layer's last two axes cut into ``rows x cols`` tiles, each kept or
  dropped whole; a block's score is the sum of its squared weights (ordered like its L2 norm),
  and the top blocks are chosen among all of a layer's blocks like single weights
  (`topkast_jax.topk`).

Everything here works on one layer's axes, so stacked layers (`topkast_jax.sparsity.stacked`)
stay per layer, and on arrays in their own shapes (reshapes that split an axis into whole
groups or blocks), so a leaf sharded on whole groups is never gathered.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from topkast_jax import automatic_sharding


def _in_layout(fn, x, out_shape):
  """``fn(x)``, with a sharded ``x``'s explicit mesh axes automatic inside (so XLA partitions
  the reshapes), the result sharded like ``x`` on the axes it still divides."""
  spec = automatic_sharding.spec_like(x, out_shape)
  return automatic_sharding.call(fn, x, spec, x)


def _divisors(size: int, at_most: int = 64) -> list[int]:
  return [d for d in range(2, min(size, at_most) + 1) if size % d == 0]


@dataclasses.dataclass(frozen=True)
class NM:
  """Keep ``n`` of every ``m`` consecutive weights along ``axis`` of each layer."""

  n: int
  m: int
  axis: int = -2  # of the layer (a stacked leaf's layer axes not counted); -2: a kernel's input

  def __post_init__(self):
    for name in ('n', 'm', 'axis'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'NM.{name} must be a Python int, got {value!r}.')
    if not 1 <= self.n < self.m <= 256:
      raise ValueError(f'NM needs 1 <= n < m <= 256, got {self.n}:{self.m}.')

  def __str__(self):
    return f'{self.n}:{self.m}'

  def check(self, name: str, layer_shape) -> None:
    """Raises ValueError, naming the leaf, unless groups of m tile ``axis`` of the layer."""
    ndim = len(layer_shape)
    if not -ndim <= self.axis < ndim:
      raise ValueError(
        f'parameter {name!r} has layers of shape {tuple(layer_shape)}: N:M {self} along axis '
        f'{self.axis} needs a layer with that axis. Give NM(..., axis=...) or mark it dense.'
      )
    size = layer_shape[self.axis]
    if size % self.m:
      fits = ', '.join(str(d) for d in _divisors(size, 16)) or 'none'
      raise ValueError(
        f'parameter {name!r} has layers of shape {tuple(layer_shape)}: N:M {self} groups '
        f'{self.m} weights along axis {self.axis}, whose size {size} is not a multiple of '
        f'{self.m}. M values up to 16 that divide {size}: {fits}.'
      )

  def keep(self, density: float) -> int:
    """Weights a group keeps at ``density``: round(density * m), half up, in [1, m]."""
    return min(self.m, max(1, math.floor(density * self.m + 0.5 + 1e-9)))

  def _grouped(self, x):
    """``x`` with the group axis split in two: (..., size / m, m, ...)."""
    axis = self.axis % x.ndim
    return x.reshape(*x.shape[:axis], x.shape[axis] // self.m, self.m, *x.shape[axis + 1 :]), axis

  def rank(self, keys: jax.Array) -> jax.Array:
    """Each entry's rank in its group (0: the largest key; ties: lower index first), int32."""
    return _in_layout(self._rank, keys, keys.shape)

  def _rank(self, keys):
    grouped, axis = self._grouped(keys)
    mine = jnp.expand_dims(grouped, axis + 2)  # entry i along axis + 1, the others along + 2
    other = jnp.expand_dims(grouped, axis + 1)
    shape = (*grouped.shape[: axis + 2], self.m, *grouped.shape[axis + 2 :])
    before = jax.lax.broadcasted_iota(jnp.int32, shape, axis + 2) < jax.lax.broadcasted_iota(
      jnp.int32, shape, axis + 1
    )
    beats = (other > mine) | ((other == mine) & before)
    return jnp.sum(beats, axis=axis + 2, dtype=jnp.int32).reshape(keys.shape)

  def group_count(self, mask: jax.Array) -> jax.Array:
    """The number of True entries of each entry's group, shaped like ``mask`` (int32)."""
    return _in_layout(self._group_count, mask, mask.shape)

  def _group_count(self, mask):
    grouped, axis = self._grouped(mask)
    counts = jnp.sum(grouped, axis=axis + 1, keepdims=True, dtype=jnp.int32)
    return jnp.broadcast_to(counts, grouped.shape).reshape(mask.shape)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Keep or drop ``rows x cols`` tiles of each layer's last two axes whole."""

  rows: int
  cols: int

  def __post_init__(self):
    for name in ('rows', 'cols'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'Blocks.{name} must be a Python int >= 1, got {value!r}.')
    if self.rows * self.cols == 1:
      raise ValueError('Blocks(1, 1) is unstructured selection: leave the structure out.')

  def __str__(self):
    return f'{self.rows}x{self.cols} blocks'

  def check(self, name: str, layer_shape) -> None:
    """Raises ValueError, naming the leaf, unless the blocks tile the layer's last two axes."""
    if len(layer_shape) < 2:
      raise ValueError(
        f'parameter {name!r} has layers of shape {tuple(layer_shape)}: {self} need two axes.'
      )
    r, c = layer_shape[-2:]
    if r % self.rows or c % self.cols:
      raise ValueError(
        f'parameter {name!r} has layers of shape {tuple(layer_shape)}: {self} must tile its '
        f'last two axes ({r} x {c}). Block rows that divide {r}: '
        f'{", ".join(map(str, _divisors(r))) or "none"}; columns that divide {c}: '
        f'{", ".join(map(str, _divisors(c))) or "none"}.'
      )

  def count(self, layer_shape) -> int:
    """Blocks per layer."""
    return math.prod(layer_shape) // (self.rows * self.cols)

  def _tiled(self, x):
    *lead, r, c = x.shape
    return x.reshape(*lead, r // self.rows, self.rows, c // self.cols, self.cols)

  def _block_shape(self, shape):
    return (*shape[:-2], shape[-2] // self.rows, shape[-1] // self.cols)

  def scores(self, x: jax.Array) -> jax.Array:
    """Sum of squares (float32) of each block: shape (..., r / rows, c / cols)."""

    def scores(x):
      return jnp.sum(jnp.square(self._tiled(x).astype(jnp.float32)), axis=(-3, -1))

    return _in_layout(scores, x, self._block_shape(x.shape))

  def of_mask(self, mask: jax.Array) -> jax.Array:
    """The block mask of a block-structured mask (a block is in if any of its weights is)."""
    return _in_layout(
      lambda m: jnp.any(self._tiled(m), axis=(-3, -1)), mask, self._block_shape(mask.shape)
    )

  def expand(self, block_mask: jax.Array) -> jax.Array:
    """A block mask as a mask of weights: each block's value over its tile."""
    *lead, br, bc = block_mask.shape
    shape = (*lead, br * self.rows, bc * self.cols)

    def expand(m):
      tiles = jnp.broadcast_to(m[..., :, None, :, None], (*lead, br, self.rows, bc, self.cols))
      return tiles.reshape(shape)

    return _in_layout(expand, block_mask, shape)


Structure = NM | Blocks | None


def require(structure, optional: bool = True) -> Structure:
  """``structure`` itself; ValueError unless it is an `NM`, `Blocks` (or, if ``optional``,
  None)."""
  if isinstance(structure, (NM, Blocks)) or (optional and structure is None):
    return structure
  allowed = 'None, NM(...) or Blocks(...)' if optional else 'NM(...) or Blocks(...)'
  raise ValueError(f'structure must be {allowed}, got {structure!r}.')


def parse(text: str) -> Structure:
  """A structure from text: ``'none'``, ``'n:m'`` (`NM`, along axis -2) or ``'RxC'``
  (`Blocks`); ValueError for anything else."""
  try:
    if text == 'none':
      return None
    if ':' in text:
      return NM(*(int(v) for v in text.split(':')))
    return Blocks(*(int(v) for v in text.split('x')))
  except (TypeError, ValueError) as e:
    raise ValueError(f"structure {text!r} is not 'none', 'n:m' (N:M) or 'RxC' (blocks): {e}") from e
