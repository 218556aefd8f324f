"""The experiment programs' console: progress, evaluations, warnings and results only."""

import logging
import os

import jax
from absl import logging as absl_logging

from topkast_jax.training.validation import check_writable

_OURS = (os.sep + 'topkast_jax' + os.sep, os.sep + 'experiments' + os.sep)


def _ours_or_errors(record: logging.LogRecord) -> bool:
  """Console filter: this project's records, and every library's errors."""
  return record.levelno >= logging.ERROR or any(part in record.pathname for part in _OURS)


def quiet_console(workdir: str, verbose: bool = False) -> str:
  """Library logs below WARNING, and other libraries' warnings, go to
  ``workdir/log_<process>.txt`` only (and to the console too when ``verbose``); progress,
  results and this project's warnings are printed. Returns the log file's path."""

  console = absl_logging.get_absl_handler()
  console.setLevel(logging.INFO if verbose else logging.WARNING)
  if not verbose:  # other libraries' warnings (tfds' OpenCV advice, ...) go to the file only
    console.addFilter(_ours_or_errors)
  check_writable(workdir)
  path = os.path.join(workdir, f'log_{jax.process_index()}.txt')  # starts the backends
  to_file = logging.FileHandler(path, encoding='utf-8')
  to_file.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
  logging.getLogger().addHandler(to_file)
  logging.getLogger().setLevel(logging.INFO)
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()  # one-off preparation bars would only clutter the console
  return path
