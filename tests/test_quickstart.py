"""The README's quickstart trains for real: Top-KAST learns Fashion-MNIST at 90% sparsity."""

import json
import os
import re
import subprocess
import sys

import pytest
from experiment_utils import xla_flags

from topkast_jax.data.idx import DEBIAN_FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
  not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
  reason='Debian package dataset-fashion-mnist is not installed',
)
def test_one_epoch_learns_and_is_sparse(tmp_path):
  # No JAX_PLATFORMS: jax probes for a TPU, whose INFO line must not reach the console.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  env['XLA_FLAGS'] = xla_flags()
  run = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'examples', 'quickstart_fashion_mnist.py'),
      '--epochs=1',
      f'--out_dir={tmp_path}',
    ],
    check=True,
    env=env,
    timeout=600,
    capture_output=True,
    text=True,
  )
  console = (run.stdout + run.stderr).splitlines()
  assert not [line for line in console if re.match(r'[IW]\d{4} ', line)], console  # no library logs
  assert [line.split()[0] for line in console if 'final test accuracy' in line] == [
    'dense',
    'topkast:',
  ]
  results = json.loads((tmp_path / 'results.json').read_text())['results']
  assert (tmp_path / 'accuracy.png').stat().st_size > 0
  for method in ('dense', 'topkast'):
    assert results[method]['final_test_accuracy'] > 0.75  # chance is 0.10
  assert results['topkast']['kernel_forward_sparsity'] == pytest.approx(0.9, abs=1e-3)
  assert results['dense']['kernel_forward_sparsity'] < 0.01
  assert results['topkast']['sparsity_metrics']['forward_density'] == pytest.approx(0.1, abs=1e-3)
