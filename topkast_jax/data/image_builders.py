"""TFDS image builders that prepare without TensorFlow, in TFDS's standard layouts.

TFDS's own builders hand numpy images to ``features.Image``, whose encoder needs TensorFlow.
These subclasses keep TFDS's dataset info (name, version, features, splits), read the raw
files with numpy and yield PNG bytes made with pillow instead, so ``download_and_prepare(file_format='array_record')`` and
``tfds.data_source`` work on a TensorFlow-free install, and the result is read by TFDS's
registered builder like any other prepared copy.
"""

from topkast_jax import extras

extras.require(__name__, 'experiments', extras.EXPERIMENTS)

import io
import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from topkast_jax.data.idx import DEBIAN_FASHION_MNIST_DIR, read_idx

_FASHION_MNIST_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


_CIFAR_RECORD = 1 + 3 * 32 * 32


def png_bytes(image: np.ndarray) -> bytes:
  """PNG encoding of a uint8 image ``[h, w, c]`` with c in (1, 3)."""
  image = np.asarray(image, np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, 'PNG')
  return buffer.getvalue()


# Resolved before skip_registration: the first access imports TFDS's module, whose own
# builders must still register.
_TfdsFashionMnist = tfds.image_classification.FashionMNIST
_TfdsCifar10 = tfds.image_classification.Cifar10

with tfds.core.registered.skip_registration():

  class FashionMnist(_TfdsFashionMnist):
    """Fashion-MNIST from local IDX files (e.g. Debian's), else TFDS's normal download."""

    name = 'fashion_mnist'

    def __init__(self, *, idx_dir: str = DEBIAN_FASHION_MNIST_DIR, **kwargs):
      self._idx_dir = idx_dir
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      names = [n for pair in _FASHION_MNIST_FILES.values() for n in pair]
      local = {n: os.path.join(self._idx_dir, n) for n in names}
      if all(os.path.exists(p) for p in local.values()):
        paths = local  # Debian's gzip headers differ from the originals: skip the checksums.
      else:
        paths = dl_manager.download({n: self.URL + n for n in names})
      return {
        split: self._generate_examples(os.fspath(paths[images]), os.fspath(paths[labels]))
        for split, (images, labels) in _FASHION_MNIST_FILES.items()
      }

    def _generate_examples(self, images_path, labels_path):
      images, labels = read_idx(images_path), read_idx(labels_path)
      if len(images) != len(labels):
        raise ValueError(
          f'{images_path} has {len(images)} images, {labels_path} has {len(labels)} labels.'
        )
      for index, (image, label) in enumerate(zip(images, labels)):
        yield index, {'image': png_bytes(image[..., None]), 'label': int(label)}

  class Cifar10(_TfdsCifar10):
    """CIFAR-10 by TFDS's download; records read with numpy, images stored as PNG."""

    name = 'cifar10'

    def _generate_examples(self, split_prefix, filepaths):
      # The binary format: per image one label byte, then 3 x 32 x 32 bytes (planar RGB).
      index = 0
      for path in filepaths:
        with open(path, 'rb') as f:
          records = np.frombuffer(f.read(), np.uint8)
        if records.size % _CIFAR_RECORD:
          raise ValueError(f'{path} is not whole CIFAR-10 records of {_CIFAR_RECORD} bytes.')
        for record in records.reshape(-1, _CIFAR_RECORD):
          image = record[1:].reshape(3, 32, 32).transpose(1, 2, 0)
          yield (
            index,
            {
              'id': f'{split_prefix}{index:05d}',
              'label': int(record[0]),
              'image': png_bytes(image),
            },
          )
          index += 1
