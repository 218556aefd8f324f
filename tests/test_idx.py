"""IDX reading and writing, and the offline Fashion-MNIST files from Debian."""

import os

import numpy as np
import pytest

from topkast_jax.data.idx import (
  DEBIAN_FASHION_MNIST_DIR,
  fashion_mnist_arrays,
  read_idx,
  write_idx,
)


@pytest.mark.parametrize('name', ['a.idx', 'a.idx.gz'])
@pytest.mark.parametrize('dtype', [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip(tmp_path, name, dtype):
  array = (np.arange(2 * 3 * 5) * 7 % 23).astype(dtype).reshape(2, 3, 5)
  path = str(tmp_path / name)
  write_idx(path, array)
  back = read_idx(path)
  assert back.dtype == array.dtype
  np.testing.assert_array_equal(back, array)


def test_known_bytes(tmp_path):
  path = tmp_path / 'labels.idx'
  path.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 8, 9]))
  np.testing.assert_array_equal(read_idx(str(path)), [7, 8, 9])


def test_corrupt_files_raise(tmp_path):
  path = tmp_path / 'short.idx'
  path.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]))
  with pytest.raises(ValueError, match='truncated or corrupt'):
    read_idx(str(path))
  path.write_bytes(b'PK\x03\x04')
  with pytest.raises(ValueError, match='is not an IDX file'):
    read_idx(str(path))


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    fashion_mnist_arrays('train', directory=str(tmp_path))


@pytest.mark.skipif(
  not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
  reason='Debian package dataset-fashion-mnist is not installed (.ci/run installs it with apt-get)',
)
def test_debian_fashion_mnist_sizes_and_classes():
  for split, n in (('train', 60000), ('test', 10000)):
    images, labels = fashion_mnist_arrays(split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)
