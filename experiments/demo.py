"""The embedded default: Fashion-MNIST ResNet trained dense and with Top-KAST, side by side.

Trains ``--config`` (default: configs/resnet_fashion_mnist.py, Top-KAST forward 0.8 / backward
0.5) once with ``method='dense'`` and once with ``method='topkast'``, each in its own
subfolder of ``--workdir`` (each resumes from its checkpoints if interrupted), then writes
``results.json`` and ``accuracy.png`` (test accuracy against step) and prints both results.

  python experiments/demo.py --workdir /tmp/topkast_demo
"""

import json
import os
import sys
import time

import matplotlib
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.console import quiet_console  # noqa: E402
from topkast_jax.atomic import atomic_file  # noqa: E402
from topkast_jax.training.train import train_and_evaluate  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
  'config', os.path.join(_ROOT, 'configs', 'resnet_fashion_mnist.py'), 'Configuration.'
)
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/topkast_demo', 'Where everything is written.')


def plot(results, path, title):
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for method, r in results.items():
    steps = [h['step'] for h in r['history']]
    ax.plot(
      steps,
      [h['accuracy'] for h in r['history']],
      marker='o',
      label=f'{method}: {r["final_eval"]["accuracy"]:.4f}',
    )
  ax.set_xlabel('training step')
  ax.set_ylabel('test accuracy')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  started = time.perf_counter()
  log = quiet_console(_WORKDIR.value, verbose=flags.FLAGS.verbosity >= 1)
  print(f'library logs: {log} (--verbosity=1 shows them here too)', flush=True)
  results = {}
  for method in ('dense', 'topkast'):
    config = _CONFIG.value.copy_and_resolve_references()
    config.method = method
    results[method] = train_and_evaluate(config, os.path.join(_WORKDIR.value, method))
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with atomic_file(os.path.join(_WORKDIR.value, 'results.json'), encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  s = _CONFIG.value.sparsity
  plot(
    results,
    os.path.join(_WORKDIR.value, 'accuracy.png'),
    f'{_CONFIG.value.model.name} (width {_CONFIG.value.model.width}) on '
    f'{_CONFIG.value.dataset}; Top-KAST {s.forward:g} / {s.backward:g}',
  )
  for method, r in results.items():
    sparsity = r['forward_sparsity_measured']
    print(
      f'{method:8s} test accuracy {r["final_eval"]["accuracy"]:.4f}  measured forward '
      f'sparsity: kernels {sparsity["kernels"]:.4f}, all parameters '
      f'{sparsity["all_parameters"]:.4f}  ({r["train_seconds"]:.0f} s)'
    )
  print(
    f'total {time.perf_counter() - started:.0f} s; wrote {_WORKDIR.value}/results.json and '
    f'{_WORKDIR.value}/accuracy.png'
  )


if __name__ == '__main__':
  app.run(main)
