"""The driver on several devices and processes: 8 devices equal 1 on the same global batch, 2
processes x 4 devices equal 1 process x 8 (a file of its own, so that pytest-xdist runs it
beside the other driver tests)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from experiment_utils import (
  TINY_TXL,
  assert_same,
  final_params,
  last_checkpoint,
  tiny_config,
  xla_flags,
)

from topkast_jax.training import state as state_lib
from topkast_jax.training.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.usefixtures('one_block_resnets')
def test_eight_devices_equal_one_device_on_the_same_global_batch(data_dir, tmp_path):
  assert jax.local_device_count() == 8
  params = []
  for devices in (8, 1):
    config = tiny_config('resnet_fashion_mnist', data_dir, steps=3)
    config.num_devices = devices
    train_and_evaluate(config, str(tmp_path / f'devices_{devices}'))
    params.append(final_params(str(tmp_path / f'devices_{devices}')))
  assert_same(*params, exact=False)


def test_a_step_on_the_replicated_state_is_traced_once():
  """The driver's first step takes `replicate`'s arrays: laid out as the step's own outputs, so
  the next steps reuse its program (from host copies, jax traced and compiled it again)."""
  traces = []

  def step(tree):
    traces.append(1)
    return jax.tree.map(lambda x: x + 1, tree)

  p_step = state_lib.pmap(step, jax.devices(), donate_argnums=(0,))
  tree = state_lib.replicate(
    {'w': np.ones(3, np.float32), 'n': np.zeros((), np.int32)}, jax.devices()
  )
  for _ in range(3):
    tree = p_step(tree)
  assert len(traces) == 1
  np.testing.assert_array_equal(tree['w'], np.full((8, 3), 4.0))


def run_processes(commands, env, timeout=420):
  """Runs commands at once; kills all with SIGKILL (JAX catches SIGTERM) if any hangs."""
  procs = [
    subprocess.Popen(
      c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    for c in commands
  ]
  deadline = time.monotonic() + timeout
  try:
    outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.send_signal(signal.SIGKILL)
    pytest.fail(f'multi-process run did not finish in {timeout} s (hang)')
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]


MULTIHOST_OVERRIDES = {
  'resnet_fashion_mnist': ['--config.model.width=4'],
  'transformer_xl_sotu': [f'--config.model.{k}={v}' for k, v in TINY_TXL.items()]
  + ['--config.tgt_len=8', '--config.eval_tgt_len=8', '--config.eval_mem_len=8'],
}


@pytest.mark.parametrize('name', sorted(MULTIHOST_OVERRIDES))
def test_two_processes_equal_one_process(name, data_dir, tmp_path):
  """2 processes x 4 CPU devices (gloo collectives) == 1 process x 8 devices after 3 steps; for
  the LM, each run's checkpoint then resumes in the other layout (memories split by process)."""
  base = [
    sys.executable,
    os.path.join(ROOT, 'tests', 'one_block_main.py'),  # the driver, ResNets of one block per stage
    '--config',
    os.path.join(ROOT, 'configs', f'{name}.py'),
    f'--config.data_dir={data_dir}',
    '--config.batch_size=16',
    '--config.eval_batch_size=8',
    '--config.log_every_steps=1',
    '--config.eval_every_steps=0',
    '--config.checkpoint_every_steps=0',
    *MULTIHOST_OVERRIDES[name],
  ]

  def env(devices):
    return dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=xla_flags(devices) + ' --xla_cpu_collective_timeout_seconds=60',
    )

  def one_process(workdir, steps):
    run_processes([base + [f'--config.num_train_steps={steps}', f'--workdir={workdir}']], env(8))

  def two_processes(workdir, steps):
    with socket.socket() as probe:  # a free port for the coordinator
      probe.bind(('127.0.0.1', 0))
      port = probe.getsockname()[1]
    flags = [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
    run_processes(
      [
        base
        + [f'--config.num_train_steps={steps}', f'--workdir={workdir}', *flags, f'--process_id={i}']
        for i in range(2)
      ],
      env(4),
    )

  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  one_process(one, 3)
  two_processes(two, 3)
  assert_same(final_params(one), final_params(two), exact=False)
  results = [json.loads((tmp_path / d / 'results.json').read_text()) for d in ('one', 'two')]
  final, counted, loss = (
    ('final_eval', 'examples', 'loss') if name.startswith('resnet') else ('test', 'tokens', 'nll')
  )
  assert results[0][final][counted] == results[1][final][counted] > 0  # each example once
  assert results[0][final][loss] == pytest.approx(results[1][final][loss], rel=1e-5)
  if name.startswith('transformer'):
    two_processes(one, 4)  # the 1-process checkpoint (memories of 16 rows), resumed by 2
    one_process(two, 4)  # and the other way round
    assert_same(last_checkpoint(one, ('carry',)), last_checkpoint(two, ('carry',)), exact=False)
    assert_same(final_params(one), final_params(two), exact=False)
