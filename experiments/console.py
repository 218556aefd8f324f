"""The experiment programs' console: progress, evaluations, warnings and results only."""

import logging
import os

import jax
from absl import logging as absl_logging

from topkast_jax.training.validation import check_writable


def quiet_console(workdir: str, verbose: bool = False) -> str:
  """Library logs below WARNING go to ``workdir/log_<process>.txt`` only (and to the console
  too when ``verbose``); progress and results are printed. Returns the log file's path."""

  absl_logging.get_absl_handler().setLevel(logging.INFO if verbose else logging.WARNING)
  check_writable(workdir)
  path = os.path.join(workdir, f'log_{jax.process_index()}.txt')  # starts the backends
  to_file = logging.FileHandler(path, encoding='utf-8')
  to_file.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
  logging.getLogger().addHandler(to_file)
  logging.getLogger().setLevel(logging.INFO)
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()  # one-off preparation bars would only clutter the console
  return path
