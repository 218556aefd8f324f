"""The study script: tiny versions of its three studies on the real data, tables, FLOPs, plots."""

import csv
import json
import os
import subprocess
import sys

import pytest
from experiment_utils import xla_flags

from topkast_jax.data.idx import DEBIAN_FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
  reason='Debian package dataset-fashion-mnist is not installed',
)


def study(out_dir, *args):
  subprocess.run(
    [sys.executable, os.path.join(ROOT, 'experiments', 'study.py'), f'--out_dir={out_dir}', *args],
    check=True,
    env=dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS='cpu'),
    timeout=600,
    capture_output=True,
  )
  with open(out_dir / 'runs.csv') as f:
    runs = list(csv.DictReader(f))
  with open(out_dir / 'table.csv') as f:
    table = list(csv.DictReader(f))
  return runs, table


@needs_fashion_mnist
def test_tiny_methods_study_on_images(tmp_path):
  methods = ['dense', 'topkast', 'static', 'rigl']  # the others: test_baselines, the driver
  runs, table = study(
    tmp_path,
    '--epochs=0.1',  # 47 steps (468 per epoch)
    '--seeds=0,1',
    '--sparsities=0.9',
    '--backward=0.8',
    '--mask_update_every=10',
    '--log_every=10',
    f'--methods={",".join(methods)}',
  )
  assert sorted({r['method'] for r in runs}) == sorted(methods) and len(runs) == 8
  rigl_updates = round(0.75 * 47) // 10 / 47  # share of steps with RigL's dense gradient
  expected_flops = {  # every kernel sparse: (2 * forward density + weight-gradient density) / 3
    'dense': 1.0,
    'topkast': (2 * 0.1 + 0.2) / 3,
    'static': 0.1,
    'rigl': (3 * 0.1 + 0.9 * rigl_updates) / 3,
  }
  for r in runs:
    expected = 0.0 if r['method'] == 'dense' else 0.9
    assert float(r['measured_sparsity']) == pytest.approx(expected, abs=1e-3)
    assert float(r['test_accuracy']) > 0.2  # chance is 0.1; 47 steps of SGD
    assert float(r['train_flops']) == pytest.approx(expected_flops[r['method']], abs=1e-3)
    assert float(r['inference_flops']) == pytest.approx(1.0 - expected, abs=1e-3)
  assert len(table) == 4 and all(int(r['seeds']) == 2 for r in table)
  assert all(float(r['test_accuracy_std']) > 0 for r in table)  # seeds differ
  assert '| rigl | 0.9 | - | - |' in (tmp_path / 'table.md').read_text()
  for name in ('test_accuracy_vs_sparsity.png', 'mask_dynamics.png'):
    assert (tmp_path / name).stat().st_size > 0
  with open(tmp_path / 'runs.json') as f:
    histories = {(r['method'], r['seed']): r['history'] for r in json.load(f)['runs']}
  topkast = histories['topkast', 0]
  assert [h['step'] for h in topkast] == [10, 20, 30, 40, 47]
  assert all(0 < h['mask_change'] < 1 for h in topkast[1:])  # Top-KAST's A moves every step
  assert all(0 <= h['entered_from_c'] <= 0.9 for h in topkast)
  assert all(h['mask_change'] == 0 for h in histories['static', 0][1:])


@needs_fashion_mnist
def test_tiny_structure_study_on_images(tmp_path):
  """2:4 and 1:8 (784 x 300 only: 300 and 100 input rows are no multiple of 8) and 4 x 2
  blocks at 0.875, with unstructured at 0.5 and 0.875: each run's measured sparsity is its
  structure's, the table and plot name the structures."""
  runs, table = study(
    tmp_path,
    '--study=structure',
    '--steps=20',
    '--log_every=10',
    '--methods=dense,topkast',
    '--structures=2:4,1:8,4x2',
  )
  got = {(r['structure'], float(r['forward_sparsity'])): r for r in runs}
  assert sorted(got) == [('1:8', 0.875), ('2:4', 0.5), ('4x2', 0.875), ('none', 0.0),
                         ('none', 0.5), ('none', 0.875)]  # fmt: skip
  for (_, level), r in got.items():
    assert float(r['measured_sparsity']) == pytest.approx(level, abs=1e-3)
    assert float(r['test_accuracy']) > 0.15  # chance is 0.1; 20 steps
  assert float(got['2:4', 0.5]['backward_sparsity']) == 0.0  # B twice A: everything
  assert float(got['1:8', 0.875]['structured_share']) == pytest.approx(235200 / 266200)
  assert float(got['4x2', 0.875]['structured_share']) == 1.0
  assert len(table) == 6
  assert '| topkast | 1:8 (0.88) | 0.875 | 0.75 | 1 |' in (tmp_path / 'table.md').read_text()
  assert (tmp_path / 'test_accuracy_vs_structure.png').stat().st_size > 0
  pivot = (tmp_path / 'structure_table.md').read_text().splitlines()
  assert pivot[0] == (
    '| method | unstructured 0.5 | 2:4 (0.5) | unstructured 0.875 | 1:8 (0.875) | 4x2 (0.875) |'
  )
  assert pivot[3].startswith('| topkast | ') and pivot[3].count(' +- ') == 5


@needs_fashion_mnist
def test_tiny_refresh_study_and_resume(tmp_path):
  args = ['--study=refresh', '--epochs=0.05', '--sparsities=0.9', '--backward=0.8']
  runs, table = study(tmp_path, *args, '--refresh_every=1,10', '--refresh_backward=0,0.8')
  got = sorted((r['method'], r['backward_sparsity'], r['update_every']) for r in runs)
  assert got == [
    ('dense', '0.0', '0'),
    ('topkast', '0.0', '1'),
    ('topkast', '0.0', '10'),
    ('topkast', '0.8', '1'),
    ('topkast', '0.8', '10'),
  ]
  assert len(table) == 5 and (tmp_path / 'refresh_interval.png').stat().st_size > 0
  # --resume keeps the finished runs (same results, not retrained) and adds the new ones.
  before = {(r['backward_sparsity'], r['update_every']): r for r in runs}
  runs, _ = study(
    tmp_path, *args, '--refresh_every=1,10,20', '--refresh_backward=0,0.8', '--resume'
  )
  assert len(runs) == 7
  for r in runs:
    key = (r['backward_sparsity'], r['update_every'])
    assert key in before or r['update_every'] == '20'
    if key in before:
      assert r == before[key]


def test_tiny_methods_study_on_characters(tmp_path):
  runs, _ = study(
    tmp_path,
    '--task=characters',
    '--steps=12',
    '--methods=dense,topkast',
    '--sparsities=0.8',
    '--backward=0',
    '--log_every=4',
  )
  dense, topkast = runs
  for r in runs:
    assert 0 < float(r['test_bpc']) < 8.5  # 8 bits is a uniform guess over bytes
  assert float(topkast['measured_sparsity']) == pytest.approx(0.8, abs=1e-3)
  # Attention and feed-forward kernels are sparse, the rest dense: their FLOPs share s is
  # read back from the inference column, and training must match it (backward 0: all of B).
  share = (1 - float(topkast['inference_flops'])) / 0.8
  assert 0.3 < share < 1
  train = 1 - share + share * (2 * 0.2 + 1.0) / 3
  assert float(topkast['train_flops']) == pytest.approx(train, rel=1e-6)
  assert float(dense['train_flops']) == 1.0
  assert (tmp_path / 'test_bpc_vs_sparsity.png').stat().st_size > 0


@needs_fashion_mnist
def test_finished_runs_are_never_dropped(tmp_path):
  """A narrower plan with --resume reports from its subset but keeps every finished run; a new
  study in a used out_dir refuses and says why."""
  args = ['--epochs=0.02', '--sparsities=0.9', '--backward=0.8']
  runs, _ = study(tmp_path, *args, '--methods=dense,static')
  runs_again, table = study(tmp_path, *args, '--methods=static', '--resume')
  assert runs_again == runs  # the dense run is still in runs.csv, and results are as they were
  assert [r['method'] for r in table] == ['static']  # the table is this plan's
  with open(tmp_path / 'runs.json') as f:
    assert sorted(r['method'] for r in json.load(f)['runs']) == ['dense', 'static']
  refused = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'experiments', 'study.py'), f'--out_dir={tmp_path}', *args],
    env=dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert refused.returncode != 0
  assert 'already holds 2 finished runs: pass --resume' in refused.stderr
  assert (tmp_path / 'runs.csv').read_text().count('\n') == 3  # header and both runs, untouched
