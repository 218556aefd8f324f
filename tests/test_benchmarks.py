"""One short round of every benchmark script, so the figures the docs quote cannot rot: each
runs end to end on the current code and prints the lines the docs show (ratios in range)."""

import importlib
import json
import os
import re

import jax
import numpy as np
import optax
from experiment_utils import ROOT, run_script

import topkast_jax


def run(name, *args, devices=1) -> str:
  return run_script(os.path.join('benchmarks', name), *args, devices=devices)


def ratios(out: str, key: str) -> list[float]:
  return [float(v) for v in re.findall(rf'{key}=([\d.]+)', out)]


def test_step_overhead_one_round():
  out = run('step_overhead.py', '--rounds=1', '--seconds=0.01', '--models=mlp')
  assert re.search(r'ratio_every_1: mlp=[\d.]+', out), out
  for step in ('blocks_4x2', 'nm_2:4', '0.5'):
    assert re.search(rf'ratio_topkast_{step}: mlp=[\d.]+', out), out
  assert all(0.2 < r < 20 for r in ratios(out, 'ratio_vs_dense')), out


def test_mask_refresh_one_round():
  out = run(
    'mask_refresh.py',
    '--repeats=1',
    '--argsort-repeats=1',
    '--width-divisor=8',
    '--kernels=6',
  )
  assert 'masks differ' not in out  # the script checks its masks against numpy first
  assert len(ratios(out, 'ratio_vs_jnp_argsort')) == 1, out
  assert len(ratios(out, 'ratio_refresh_vs_one_pass')) == 1, out
  assert len(ratios(out, 'ratio_nm_vs_unstructured')) == 1, out  # counts checked by the script
  assert len(ratios(out, 'ratio_blocks_vs_unstructured')) == 1, out


def test_sparse_export_one_round():
  out = run('sparse_export.py', '--rounds=1', '--sparsities=0.95', '--structures=1')
  assert len(ratios(out, 'ratio_vs_dense')) == 2, out  # inference, and the 2:4 export's size
  assert len(ratios(out, 'ratio_vs_unstructured')) == 1, out
  assert 'loads back to alpha exactly' in out


def test_state_memory_one_round(tmp_path):
  out = run(
    'state_memory.py',
    '--time_models=mlp',
    '--memory_models=resnet50',
    '--rounds=1',
    '--seconds=0.01',
    f'--out_dir={tmp_path}',
  )
  assert re.search(r'\| resnet50 .* \| adam \| 0\.9 / 0\.8 \|', out), out
  assert len(ratios(out, 'compact_vs_dense_state')) == 1, out
  assert (tmp_path / 'state_memory.json').stat().st_size > 0


def test_sharded_collectives_table():
  out = run('sharded_collectives.py', devices=8)
  for layout in ('fsdp', 'tensor_parallel'):
    rows = [line for line in out.splitlines() if line.startswith(f'| {layout} |')]
    assert len(rows) == 3, out  # dense adam, Top-KAST dense-state, Top-KAST compact


def test_step_memory_table(tmp_path):
  out = run(
    'step_memory.py', '--models=mlp', '--methods=topkast,topkast_compact', f'--out_dir={tmp_path}'
  )
  rows = json.loads((tmp_path / 'step_memory.json').read_text())['mlp']
  assert set(rows) == {'dense', 'topkast', 'topkast_compact'}, out
  for name, row in rows.items():
    assert f'| {name} | ' in out
    parts = row['arguments_mib'] + row['temporaries_mib'] + row['outputs_mib'] - row['aliased_mib']
    assert row['peak_mib'] == parts
    assert row['arguments_mib'] >= row['params_and_state_mib'] > 0  # the batch comes on top
  # The compact state holds Adam's moments for |B| = 20% of the sparse weights only.
  assert rows['topkast_compact']['params_and_state_mib'] < rows['topkast']['params_and_state_mib']


def test_alpha_recompute_variants_take_the_same_gradient(capsys, monkeypatch):
  """The saved and the two recomputing variants compare one step: gradients equal, every line."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, 'benchmarks'))
  alpha_recompute = importlib.import_module('alpha_recompute')

  keys = jax.random.split(jax.random.key(0), 5)
  params = [
    (jax.random.normal(keys[2 * i], (16, 32)), jax.random.normal(keys[2 * i + 1], (32, 16)))
    for i in range(2)
  ]
  x = jax.random.normal(keys[4], (4, 16))
  tx = topkast_jax.topkast(optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.8)
  state = tx.init(params)
  saved = topkast_jax.sparse_value_and_grad(alpha_recompute.loss)(params, state, x)[1]
  dense = jax.grad(alpha_recompute.loss)(params, x)
  for loss in (
    alpha_recompute.loss_recomputed_per_layer,
    alpha_recompute.loss_recomputed_in_backward,
  ):
    got = jax.grad(loss)(params, state, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, saved)
  assert not np.allclose(dense[0][0], saved[0][0])  # at the sparse point, not the dense one

  alpha_recompute.main(['--layers=2', '--d=16', '--hidden=32', '--batch=4'])
  out = capsys.readouterr().out
  assert re.search(r'dense .* ratio_vs_dense=1\.000', out), out
  assert len(ratios(out, 'ratio_vs_dense')) == 4, out
