"""Sparse export of the forward parameters alpha: values and indices per sparse leaf.

`export_sparse` turns a trained model (params and the optimizer state holding its masks) into
a pytree shaped like the params whose sparse leaves are ``jax.experimental.sparse.BCOO``
arrays holding only A's entries; `densify` gives back the exact dense alpha. `to_arrays` is the
same as a flat ``{path: numpy array}`` dict (flat int32 indices, values and shape per sparse
leaf), which ``numpy.savez`` and orbax save as is; `save_npz` and `load_npz` do that.

A model trained with a structure exports in the layout its kernels run
(`topkast_jax.hardware_formats`): `structured_arrays` (or ``save_npz(..., structure=...)``)
writes N:M leaves as kept values and slot indices, block leaves as block CSR; `from_arrays`
and `load_npz` read every layout.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from topkast_jax import bitmask, hardware_formats
from topkast_jax.atomic import atomic_file
from topkast_jax.sparsity import path_name
from topkast_jax.states import find_sparse_state, is_masked, matched_masks
from topkast_jax.structure import NM, Blocks, Structure, require


def _is_bcoo(x) -> bool:
  return isinstance(x, sparse.BCOO)


def export_sparse(params, opt_state):
  """alpha with every sparse leaf as a BCOO of A's exact entries (dense leaves unchanged).

  Raises:
    ValueError: if ``opt_state`` holds no Top-KAST state, or one without any sparse leaf, or
      if ``params`` is not the tree the state was initialised with.
  """
  forward, _ = matched_masks(params, find_sparse_state(opt_state))
  masks = [
    m if is_masked(m) else bitmask.unpack(m) for m in jax.tree.leaves(forward, is_leaf=is_masked)
  ]
  if all(is_masked(m) for m in masks):
    raise ValueError(
      'the optimizer state holds no masks (every parameter is dense): there is nothing sparse '
      'to export. Save the params as they are.'
    )
  leaves, treedef = jax.tree_util.tree_flatten(params)
  exported = []
  for leaf, mask in zip(leaves, masks):
    if is_masked(mask):
      exported.append(leaf)
      continue
    indices = np.argwhere(np.asarray(mask)).astype(np.int32)  # row-major: sorted, unique
    values = np.asarray(leaf)[tuple(indices.T)]
    exported.append(sparse.BCOO((jnp.asarray(values), jnp.asarray(indices)), shape=leaf.shape))
  return treedef.unflatten(exported)


def densify(exported):
  """The dense alpha of an exported tree: zeros outside A."""
  return jax.tree.map(lambda x: x.todense() if _is_bcoo(x) else x, exported, is_leaf=_is_bcoo)


def _checked_name(path, arrays) -> str:
  name = path_name(path)
  if '@' in name or name in arrays or any(k.startswith(f'{name}@') for k in arrays):
    raise ValueError(
      f'cannot export the parameter at {name!r}: its key path contains "@" or "/" inside a '
      'key, or names another parameter too, and the file would lose one of them. Rename it.'
    )
  return name


def to_arrays(exported) -> dict[str, np.ndarray]:
  """``{path: array}``; a sparse leaf at ``p`` becomes ``p@values``, ``p@indices`` (flat int32,
  row-major) and ``p@shape``."""
  arrays = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(exported, is_leaf=_is_bcoo)[0]:
    name = _checked_name(path, arrays)
    if _is_bcoo(leaf):
      flat = np.ravel_multi_index(tuple(np.asarray(leaf.indices).T), leaf.shape)
      arrays[f'{name}@values'] = np.asarray(leaf.data)
      arrays[f'{name}@indices'] = flat.astype(np.int32)
      arrays[f'{name}@shape'] = np.asarray(leaf.shape, np.int64)
    else:
      arrays[name] = np.asarray(leaf)
  return arrays


def structured_arrays(params, opt_state, structure: Structure) -> dict[str, np.ndarray]:
  """``{path: array}`` with every sparse leaf in ``structure``'s layout: for `NM`,
  ``p@nm_values`` and ``p@nm_index`` (`hardware_formats.to_nm`) and ``p@nm`` ``(n, m, axis)``;
  for `Blocks`, ``p@bcsr_data``, ``p@bcsr_indices``, ``p@bcsr_indptr`` and ``p@bcsr_block``
  ``(rows, cols)``; both with ``p@shape``. Dense leaves as they are.

  Raises:
    ValueError: if a sparse leaf's mask does not have ``structure`` (naming the leaf).
  """
  require(structure, optional=False)
  forward, _ = matched_masks(params, find_sparse_state(opt_state))
  arrays = {}
  for (path, leaf), mask in zip(
    jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(forward, is_leaf=is_masked)
  ):
    name, leaf = _checked_name(path, arrays), np.asarray(leaf)
    if is_masked(mask):
      arrays[name] = leaf
      continue
    mask = np.asarray(bitmask.unpack(mask))
    alpha = np.where(mask, leaf, np.zeros_like(leaf))
    if isinstance(structure, NM):
      values, index = hardware_formats.to_nm(alpha, mask, structure, repr(name))
      arrays.update({f'{name}@nm_values': values, f'{name}@nm_index': index})
      arrays[f'{name}@nm'] = np.asarray([structure.n, structure.m, structure.axis], np.int64)
    else:
      data, indices, indptr = hardware_formats.to_block_csr(alpha, mask, structure, repr(name))
      arrays.update({f'{name}@bcsr_data': data, f'{name}@bcsr_indices': indices})
      arrays[f'{name}@bcsr_indptr'] = indptr
      arrays[f'{name}@bcsr_block'] = np.asarray([structure.rows, structure.cols], np.int64)
    arrays[f'{name}@shape'] = np.asarray(leaf.shape, np.int64)
  return arrays


def _structured_leaf(arrays, base, part):
  """The dense leaf of an N:M or block-CSR export."""
  shape = tuple(int(d) for d in arrays[f'{base}@shape'])
  if part == 'nm_values':
    n, m, axis = (int(v) for v in arrays[f'{base}@nm'])
    return hardware_formats.from_nm(arrays[f'{base}@nm_values'], arrays[f'{base}@nm_index'],
                                    NM(n, m, axis), shape)  # fmt: skip
  rows, cols = (int(v) for v in arrays[f'{base}@bcsr_block'])
  parts = (arrays[f'{base}@bcsr_{k}'] for k in ('data', 'indices', 'indptr'))
  return hardware_formats.from_block_csr(*parts, Blocks(rows, cols), shape)


def from_arrays(arrays, like=None):
  """Dense alpha from `to_arrays`' dict: shaped like ``like`` (any params tree of the same
  paths, e.g. the model's params or ``jax.eval_shape`` of them), or as nested dicts."""
  dense = {}
  for name in arrays:
    base, _, part = name.partition('@')
    if part in ('nm_values', 'bcsr_data'):
      dense[base] = _structured_leaf(arrays, base, part)
    elif part in ('', 'values'):
      if not part:
        dense[base] = np.asarray(arrays[name])
        continue
      shape, index = tuple(arrays[f'{base}@shape']), np.asarray(arrays[f'{base}@indices'])
      size = int(np.prod(shape))
      if index.shape != arrays[name].shape or (
        index.size and (index[0] < 0 or index[-1] >= size or np.any(np.diff(index) <= 0))
      ):
        raise ValueError(
          f'the export of {base!r} is damaged: its indices must be one per value, increasing '
          f'and in [0, {size}) for shape {shape}.'
        )
      leaf = np.zeros(shape, arrays[name].dtype)
      leaf.flat[index] = arrays[name]
      dense[base] = leaf
  if like is not None:
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    missing = [path_name(p) for p, _ in paths if path_name(p) not in dense]
    if missing:
      raise ValueError(f'the exported arrays hold no parameter at {missing[:5]}.')
    for p, x in paths:
      if tuple(np.shape(x)) != dense[path_name(p)].shape:
        raise ValueError(
          f'the exported {path_name(p)!r} has shape {dense[path_name(p)].shape}, `like` has '
          f'{tuple(np.shape(x))}.'
        )
    return treedef.unflatten([dense[path_name(p)] for p, _ in paths])
  tree = {}
  for name, leaf in dense.items():
    *parents, key = name.split('/')
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[key] = leaf
  return tree


def save_npz(path: str, params, opt_state, structure: Structure = None) -> None:
  """Writes the sparse export of ``params`` to ``path`` (.npz), atomically: values and flat
  indices, or with a ``structure`` its layout (`structured_arrays`)."""
  if structure is None:
    arrays = to_arrays(export_sparse(params, opt_state))
  else:
    arrays = structured_arrays(params, opt_state, structure)
  with atomic_file(path, 'wb') as f:
    np.savez(f, **arrays)


def load_npz(path: str, like=None):
  """The dense alpha saved by `save_npz` (see `from_arrays` for ``like``)."""
  with np.load(path) as arrays:
    return from_arrays(dict(arrays), like)
