"""Runs one experiment: the same command on a CPU, a GPU or a multi-host TPU/GPU pod.

  python experiments/main.py --config configs/resnet_fashion_mnist.py --workdir /tmp/run \
      [--config.method=dense] [--config.sparsity.forward=0.9]

The console shows progress, evaluations and warnings; library INFO logs go to
``workdir/log_<process>.txt`` (``--verbosity=1`` prints them too).

Multi-host: pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every
host (or nothing on Cloud TPU, where jax.distributed finds them itself with --distributed).
"""

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

# Config files import their siblings as `configs.<name>`: the repository root must be importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.console import quiet_console  # noqa: E402
from topkast_jax.training.train import train_and_evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment configuration file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and results go here.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize().')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _COORDINATOR.value or _DISTRIBUTED.value:
    # Affects only CPU devices (no backend may be touched before initialize()).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  log = quiet_console(_WORKDIR.value, verbose=flags.FLAGS.verbosity >= 1)
  if jax.process_index() == 0:
    print(f'library logs: {log} (--verbosity=1 shows them here too)', flush=True)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
