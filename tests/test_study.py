"""The study script trains the methods on the real Fashion-MNIST and writes its tables."""

import csv
import os
import subprocess
import sys

import pytest

from topkast_jax.data.idx import DEBIAN_FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
  not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
  reason='Debian package dataset-fashion-mnist is not installed',
)
def test_tiny_study_trains_methods_over_seeds_and_writes_tables(tmp_path):
  methods = ['dense', 'topkast', 'static', 'rigl']  # the others: test_baselines, the driver
  subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'experiments', 'study.py'),
      f'--out_dir={tmp_path}',
      '--epochs=0.1',  # 46 steps
      '--seeds=0,1',
      '--sparsities=0.9',
      '--backward=0.8',
      '--update_every=10',
      '--mask_update_every=10',
      f'--methods={",".join(methods)}',
    ],
    check=True,
    env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'),
    timeout=600,
    capture_output=True,
  )
  with open(tmp_path / 'runs.csv') as f:
    runs = list(csv.DictReader(f))
  assert sorted({r['method'] for r in runs}) == sorted(methods) and len(runs) == 8
  for r in runs:
    expected = 0.0 if r['method'] == 'dense' else 0.9
    assert float(r['measured_sparsity']) == pytest.approx(expected, abs=1e-3)
    assert float(r['test_accuracy']) > 0.2  # chance is 0.1; 46 steps of SGD
  with open(tmp_path / 'table.csv') as f:
    table = list(csv.DictReader(f))
  assert len(table) == 4 and all(int(r['seeds']) == 2 for r in table)
  assert all(float(r['test_accuracy_std']) > 0 for r in table)  # seeds differ
  assert (tmp_path / 'accuracy_vs_sparsity.png').stat().st_size > 0
  assert '| rigl | 0.9 |' in (tmp_path / 'table.md').read_text()
