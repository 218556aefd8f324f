"""IDX files (the MNIST family's format) and the offline Fashion-MNIST copy from Debian.

IDX: two zero bytes, a type code, the number of dimensions, each dimension as a big-endian
uint32, then the values in C order, big-endian. Files may be gzip-compressed.
"""

import gzip
import os

import numpy as np

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_MNIST_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_TYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (plain or .gz) into a native-endian numpy array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b'\0\0' or data[2] not in _TYPES:
    raise ValueError(f'{path} is not an IDX file (header {data[:4]!r}).')
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data[4:header], '>u4'))
  dtype = np.dtype(_TYPES[data[2]])
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(
      f'{path} holds {len(data)} bytes but its header {shape} needs {expected}; '
      'the file is truncated or corrupt.'
    )
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes ``array`` as an IDX file (gzip-compressed if ``path`` ends in .gz)."""
  array = np.asarray(array)
  codes = {np.dtype(v).newbyteorder('='): k for k, v in _TYPES.items()}
  if array.dtype not in codes:
    raise ValueError(f'IDX has no type for {array.dtype}; use one of {sorted(map(str, codes))}.')
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  body = array.astype(array.dtype.newbyteorder('>')).tobytes()
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + body)


def fashion_mnist_arrays(split: str, directory: str = DEBIAN_FASHION_MNIST_DIR):
  """``(images uint8 [n, 28, 28], labels uint8 [n])`` of a Fashion-MNIST split from IDX files.

  Raises:
    FileNotFoundError: with the command that installs the files, if they are missing.
  """
  if split not in _FASHION_MNIST_FILES:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  paths = [os.path.join(directory, name) for name in _FASHION_MNIST_FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
      f'Fashion-MNIST files not found: {", ".join(missing)}. On Debian or Ubuntu install them '
      'with `sudo apt-get install dataset-fashion-mnist`, or point `directory` at a folder '
      'holding the four IDX .gz files.'
    )
  images, labels = (read_idx(p) for p in paths)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
      f'{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels.'
    )
  return images, labels
