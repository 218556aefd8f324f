"""Image builders (from files the tests write, and Debian's Fashion-MNIST) and pipelines."""

import hashlib
import io
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from topkast_jax.data import sources
from topkast_jax.data.idx import DEBIAN_FASHION_MNIST_DIR, write_idx
from topkast_jax.data.image_builders import Cifar10
from topkast_jax.data.images import (
  SPECS,
  ImageSpec,
  center_crop,
  eval_batches,
  inception_crop_flip,
  pad_crop_flip,
  train_dataset,
)


def digest(image):
  return hashlib.md5(np.ascontiguousarray(image).tobytes()).hexdigest()


def write_fashion_mnist(folder, n_train=30, n_test=12):
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    write_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), labels)
    arrays['train' if prefix == 'train' else 'test'] = (images, labels)
  return arrays


def test_fashion_mnist_builder_from_idx_files(tmp_path):
  arrays = write_fashion_mnist(str(tmp_path))
  data_dir = str(tmp_path / 'tfds')
  folder = sources.prepare('fashion_mnist', data_dir, idx_dir=str(tmp_path))
  assert folder.endswith(os.path.join('fashion_mnist', '3.0.1'))  # TFDS's standard layout
  for split, (images, labels) in arrays.items():
    source = sources.data_source('fashion_mnist', split, data_dir)
    got = sorted(
      (digest(source[i]['image'][..., 0]), int(source[i]['label'])) for i in range(len(source))
    )
    assert got == sorted((digest(x), int(y)) for x, y in zip(images, labels))
  # TFDS's own registered reader opens the same copy.
  assert len(tfds.data_source('fashion_mnist', split='test', data_dir=data_dir)) == 12


@pytest.mark.skipif(
  not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
  reason='Debian package dataset-fashion-mnist is not installed',
)
def test_fashion_mnist_from_debian_files(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  sources.prepare('fashion_mnist', data_dir)
  for split, n in (('train', 60000), ('test', 10000)):
    source = tfds.data_source(
      'fashion_mnist',
      split=split,
      data_dir=data_dir,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
    labels = np.array([source[i]['label'] for i in range(len(source))])
    assert len(source) == n
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)


def test_cifar10_builder_reads_binary_records_without_tensorflow(tmp_path):
  rng = np.random.default_rng(1)
  planar = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
  path = tmp_path / 'data_batch_1.bin'
  path.write_bytes(b''.join(bytes([7 - i]) + planar[i].tobytes() for i in range(3)))
  examples = list(Cifar10(data_dir=str(tmp_path))._generate_examples('train_', [str(path)]))
  assert [k for k, _ in examples] == [0, 1, 2]
  for i, (_, example) in enumerate(examples):
    assert example['label'] == 7 - i and example['id'] == f'train_{i:05d}'
    decoded = np.asarray(PIL.Image.open(io.BytesIO(example['image'])))
    np.testing.assert_array_equal(decoded, planar[i].transpose(1, 2, 0))
  path.write_bytes(b'\x00' * 100)
  with pytest.raises(ValueError, match='not whole CIFAR-10 records'):
    list(Cifar10(data_dir=str(tmp_path))._generate_examples('train_', [str(path)]))


def fake_source(n, shape=(6, 6, 1)):
  """Examples whose image encodes their index, for coverage checks."""
  return [
    {'image': np.full(shape, i % 256, np.uint8) + np.zeros(shape, np.uint8), 'label': i}
    for i in range(n)
  ]


TINY = ImageSpec(mean=(0.0,), std=(1 / 255,), train_augment='pad_crop_flip', image_size=6, pad=1)


def test_train_global_batch_is_the_same_for_any_process_count_and_epochs_are_permutations():
  n, batch = 48, 16
  one = train_dataset(fake_source(n), TINY, global_batch_size=batch, seed=3, num_devices=8)
  for processes in (2, 4):
    shards = [
      train_dataset(
        fake_source(n),
        TINY,
        global_batch_size=batch,
        seed=3,
        num_devices=2,
        process_index=p,
        process_count=processes,
      )
      for p in range(processes)
    ]
    assert shards[0][0]['image'].shape == (2, batch // processes // 2, 6, 6, 1)
    for step in (0, 1, 5):
      for key in ('image', 'label'):  # process p holds rows [p*B/P, (p+1)*B/P) of the batch
        joined = np.concatenate([s[step][key].reshape(batch // processes, -1) for s in shards])
        np.testing.assert_array_equal(joined, one[step][key].reshape(batch, -1))
  steps_per_epoch = n // batch
  epochs = [
    np.concatenate(
      [one[s]['label'].ravel() for s in range(e * steps_per_epoch, (e + 1) * steps_per_epoch)]
    )
    for e in range(2)
  ]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))  # each example once an epoch
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
  again = train_dataset(fake_source(n), TINY, global_batch_size=batch, seed=3, num_devices=8)
  np.testing.assert_array_equal(again[1]['image'], one[1]['image'])  # resuming needs only the step
  other_seed = train_dataset(fake_source(n), TINY, global_batch_size=batch, seed=4, num_devices=8)
  assert not np.array_equal(other_seed[0]['label'], one[0]['label'])
  with pytest.raises(ValueError, match='fewer than one batch'):
    train_dataset(fake_source(8), TINY, global_batch_size=16, seed=3, num_devices=8)


@pytest.mark.parametrize('n, processes', [(50, 1), (50, 3), (7, 2)])
def test_eval_counts_every_example_once(n, processes):
  counts, lengths = np.zeros(n, int), []
  for p in range(processes):
    batches = list(
      eval_batches(
        fake_source(n),
        TINY,
        global_batch_size=4 * processes,
        num_devices=2,
        process_index=p,
        process_count=processes,
      )
    )
    lengths.append(len(batches))
    for b in batches:
      valid = b['mask'] > 0
      np.add.at(counts, b['label'][valid], 1)
      np.testing.assert_array_equal(np.rint(b['image'][valid][:, 0, 0, 0]), b['label'][valid] % 256)
  assert np.all(counts == 1)
  assert len(set(lengths)) == 1  # every process runs the same number of eval steps


def test_augmentations():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  out = pad_crop_flip(image, rng, 4)
  assert out.shape == image.shape
  crop = inception_crop_flip(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8), rng, 224)
  assert crop.shape == (224, 224, 3)
  wide = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
  assert center_crop(wide, 256, 224).shape == (224, 224, 3)
  # Without resizing, the center crop is the exact middle.
  np.testing.assert_array_equal(center_crop(image, None, 16), image[8:24, 8:24])


@pytest.mark.parametrize(
  'name, shape', [('cifar10', (2, 4, 32, 32, 3)), ('imagenet2012', (2, 4, 224, 224, 3))]
)
def test_pipelines_on_tfds_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    train = tfds.data_source(name, split='train')
    evaluation = tfds.data_source(name, split='validation' if name == 'imagenet2012' else 'test')
    batch = train_dataset(train, SPECS[name], global_batch_size=8, seed=0, num_devices=2)[0]
    assert batch['image'].shape == shape and batch['image'].dtype == np.float32
    batches = list(eval_batches(evaluation, SPECS[name], global_batch_size=8, num_devices=2))
    assert batches[0]['image'].shape == shape
    assert sum(float(b['mask'].sum()) for b in batches) == 10


def test_missing_data_set_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    sources.data_source('fashion_mnist', 'train', str(tmp_path))
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar') as e:
    sources.data_source('imagenet2012', 'train', str(tmp_path))
  assert f'prepare imagenet2012 --data_dir {tmp_path}`' in str(e.value)  # the dir in use
  with pytest.raises(FileNotFoundError, match=f'prepare cifar10 --data_dir {tmp_path}`'):
    sources.open_split('cifar10', 'train', str(tmp_path))  # not offline: never auto-prepared
  with pytest.raises(ValueError, match="unknown data set 'mnist'"):
    sources.prepare('mnist', str(tmp_path))
