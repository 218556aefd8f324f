"""The compressed layouts that structured-sparse kernels run: N:M and block CSR, as numpy arrays.

* N:M (`to_nm`): along the group axis (a kernel's input axis) only the n kept values of every
  group of m remain, in index order, so that axis shrinks by n / m; beside them, each value's
  slot in its group (uint8, 0 ... m - 1): the values-plus-metadata layout of sparse tensor
  cores (2:4 on NVIDIA GPUs: two 2-bit indices per group there; a byte each here).
* Block CSR (`to_block_csr`): the leaf as a matrix of its last axis against all others (so a
  conv kernel's (h, w, in) rows, or a stack's layers, follow one another), cut into the
  ``rows x cols`` blocks of its `topkast_jax.structure.Blocks`; ``indptr`` (int32, one per
  block row, plus one), ``indices`` (int32 block columns, increasing in each block row) and
  ``data`` (one ``rows x cols`` tile per kept block), as block-sparse kernels read them.

Both take the forward parameters and their mask and give back exactly the forward
parameters (`from_nm`, `from_block_csr`).
"""

import numpy as np

from topkast_jax.structure import NM, Blocks


def to_nm(alpha: np.ndarray, mask: np.ndarray, nm: NM, name: str = 'the leaf'):
  """``(values, index)``: the kept values of an N:M ``mask`` and their slots in their groups.

  Raises:
    ValueError: if some group of ``mask`` does not hold exactly ``nm.n`` weights.
  """
  alpha, mask = np.asarray(alpha), np.asarray(mask, bool)
  axis = nm.axis % alpha.ndim
  groups = np.moveaxis(mask, axis, -1).reshape(-1, nm.m)
  held = groups.sum(axis=1)
  if (held != nm.n).any():
    raise ValueError(
      f'the mask of {name} is not {nm} along axis {nm.axis}: a group holds {held[held != nm.n][0]}'
      ' weights. Export with the structure the model was trained with.'
    )
  slots = np.argsort(~groups, axis=1, kind='stable')[:, : nm.n]  # kept slots, in index order
  values = np.take_along_axis(np.moveaxis(alpha, axis, -1).reshape(-1, nm.m), slots, axis=1)
  moved = np.moveaxis(alpha, axis, -1).shape
  shape = (*moved[:-1], moved[-1] // nm.m * nm.n)

  def back(x):
    return np.moveaxis(x.reshape(shape), -1, axis)

  return back(values), back(slots.astype(np.uint8))


def from_nm(values: np.ndarray, index: np.ndarray, nm: NM, shape) -> np.ndarray:
  """The dense array of `to_nm`'s result, zero outside the kept values."""
  axis = nm.axis % len(shape)
  values = np.moveaxis(np.asarray(values), axis, -1).reshape(-1, nm.n)
  index = np.moveaxis(np.asarray(index), axis, -1).reshape(-1, nm.n).astype(np.int64)
  if index.shape != values.shape or (index >= nm.m).any():
    raise ValueError(f'damaged N:M export: indices must be one per value, each below {nm.m}.')
  dense = np.zeros((values.shape[0], nm.m), values.dtype)
  np.put_along_axis(dense, index, values, axis=1)
  moved = list(shape)
  moved.append(moved.pop(axis))
  return np.moveaxis(dense.reshape(moved), -1, axis)


def _matrix_blocks(x, blocks: Blocks):
  """(block rows, block cols, rows, cols) view of ``x`` as a (prod(shape[:-1]), shape[-1])
  matrix."""
  matrix = np.asarray(x).reshape(-1, x.shape[-1])
  r, c = matrix.shape
  tiles = matrix.reshape(r // blocks.rows, blocks.rows, c // blocks.cols, blocks.cols)
  return tiles.transpose(0, 2, 1, 3)


def to_block_csr(alpha: np.ndarray, mask: np.ndarray, blocks: Blocks, name: str = 'the leaf'):
  """``(data, indices, indptr)``: the kept blocks of a block-structured ``mask`` in CSR order.

  Raises:
    ValueError: if some block of ``mask`` is neither all kept nor all dropped.
  """
  alpha, mask = np.asarray(alpha), np.asarray(mask, bool)
  held = _matrix_blocks(mask, blocks).sum(axis=(2, 3))
  if ((held != 0) & (held != blocks.rows * blocks.cols)).any():
    raise ValueError(
      f'the mask of {name} is not made of whole {blocks}. Export with the structure the model '
      'was trained with.'
    )
  kept = held > 0
  rows, cols = np.nonzero(kept)  # row-major: block rows in order, columns increasing
  indptr = np.concatenate([[0], np.cumsum(kept.sum(axis=1))]).astype(np.int32)
  return _matrix_blocks(alpha, blocks)[rows, cols], cols.astype(np.int32), indptr


def from_block_csr(data, indices, indptr, blocks: Blocks, shape) -> np.ndarray:
  """The dense array of `to_block_csr`'s result, zero outside the kept blocks."""
  data, indices, indptr = np.asarray(data), np.asarray(indices), np.asarray(indptr)
  block_rows = int(np.prod(shape[:-1])) // blocks.rows
  block_cols = shape[-1] // blocks.cols
  if (
    indptr.shape != (block_rows + 1,)
    or indptr[0] != 0
    or indptr[-1] != len(indices)
    or len(indices) != len(data)
    or np.any(np.diff(indptr) < 0)
    or (indices.size and (indices.min() < 0 or indices.max() >= block_cols))
  ):
    raise ValueError(f'damaged block-CSR export for shape {tuple(shape)} and {blocks}.')
  tiles = np.zeros((block_rows, block_cols, blocks.rows, blocks.cols), data.dtype)
  tiles[np.repeat(np.arange(block_rows), np.diff(indptr)), indices] = data
  return tiles.transpose(0, 2, 1, 3).reshape(shape)
