"""The experiment driver: every config runs, resume is bit-exact, pmap and multi-host agree."""

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from topkast_jax.data import sources
from topkast_jax.training import checkpoint as checkpoint_lib
from topkast_jax.training import common
from topkast_jax.training.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RESNET = dict(width=4)
TINY_TXL = dict(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=8)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Tiny real-format copies of the data sets that can be prepared offline."""
  from test_image_data import write_fashion_mnist
  from test_text_data import write_wikitext

  root = tmp_path_factory.mktemp('data')
  data_dir = str(root / 'tfds')
  write_fashion_mnist(str(root), n_train=64, n_test=20)
  sources.prepare('fashion_mnist', data_dir, idx_dir=str(root))
  text = ('The quick brown fox jumps over the lazy dog. ' * 400).encode()
  with zipfile.ZipFile(root / 'enwik8.zip', 'w') as archive:
    archive.writestr('enwik8', text)
  sources.prepare('enwik8', data_dir, source=str(root / 'enwik8.zip'), num_test_bytes=1500)
  write_wikitext(str(root / 'wikitext-103'))
  for name in ('wiki.train.tokens', 'wiki.valid.tokens', 'wiki.test.tokens'):
    path = root / 'wikitext-103' / name
    path.write_text(path.read_text() * 40)
  sources.prepare('wikitext103', data_dir, source=str(root / 'wikitext-103'))
  speeches = root / 'speeches'
  speeches.mkdir()
  for i in range(40):
    (speeches / f'{1900 + i}-X-1.txt').write_text(f'Address {i}: the state of the union. ' * 30)
  sources.prepare('sotu', data_dir, source=str(speeches))
  return data_dir


def tiny_config(name, data_dir, steps=1):
  module, _, variant = name.partition(':')
  config = importlib.import_module(f'configs.{module}').get_config(*([variant] if variant else []))
  config.data_dir = data_dir
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 0
  config.batch_size = config.eval_batch_size = 8
  if config.task == 'image_classification':
    config.model.update(TINY_RESNET)
    config.half_precision = False
    if config.dataset == 'imagenet2012':
      config.image_size = 32
  else:
    config.model.update(TINY_TXL)
    config.tgt_len = config.eval_tgt_len = config.eval_mem_len = 8
    if config.model.get('cutoffs'):
      config.model.cutoffs = (4, 8)
      config.model.div_val = 2
  return config


CONFIGS = [
  'resnet_fashion_mnist',
  'resnet_cifar10',
  'resnet50_imagenet',
  'transformer_xl_sotu',
  'transformer_xl_enwik8',
  'transformer_xl_enwik8:small',
  'transformer_xl_wikitext103',
]


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_runs_a_train_and_eval_step(name, data_dir, tmp_path, monkeypatch):
  config = tiny_config(name, data_dir)
  if config.dataset in ('cifar10', 'imagenet2012'):  # cannot be prepared here: TFDS mock data
    mock = tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE)
    mock.__enter__()
    monkeypatch.setattr(
      common.sources,
      'data_source',
      lambda name, split, data_dir=None: tfds.data_source(name, split=split),
    )
  try:
    results = train_and_evaluate(config, str(tmp_path))
  finally:
    if config.dataset in ('cifar10', 'imagenet2012'):
      mock.__exit__(None, None, None)
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['steps'] == 1 and saved['method'] == 'topkast'
  metrics = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert any('train/loss' in line for line in metrics)
  assert any('topkast/forward_density' in line for line in metrics)
  density = results['topkast_metrics']['forward_density']
  assert density == pytest.approx(1 - config.sparsity.forward, abs=0.01)
  if config.task == 'image_classification':
    expected = 20 if config.dataset == 'fashion_mnist' else 16
    assert results['final_eval']['examples'] == expected
    assert np.isfinite(results['final_eval']['loss'])
  else:
    assert np.isfinite(results['test']['bits_per_token'])
    assert results['test']['tokens'] > 0
  assert os.listdir(tmp_path / 'tensorboard')


def final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  manager.close()
  return restored['state']['params']


def assert_same(a, b, exact=True, rtol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


def test_resume_after_crash_is_bit_identical(data_dir, tmp_path, monkeypatch):
  config = tiny_config('resnet_fashion_mnist', data_dir, steps=6)
  config.checkpoint_every_steps = 3
  train_and_evaluate(config, str(tmp_path / 'straight'))

  real_save = checkpoint_lib.Checkpointer.save

  def save_then_crash(self, step, tree):
    real_save(self, step, tree)
    if step == 3:
      raise KeyboardInterrupt('simulated crash after the step-3 checkpoint')

  monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save', save_then_crash)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, str(tmp_path / 'resumed'))
  monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save', real_save)
  results = train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert results['resumed_from_step'] == 3
  assert_same(final_params(str(tmp_path / 'straight')), final_params(str(tmp_path / 'resumed')))


def test_eight_devices_equal_one_device_on_the_same_global_batch(data_dir, tmp_path):
  assert jax.local_device_count() == 8
  params = []
  for devices in (8, 1):
    config = tiny_config('resnet_fashion_mnist', data_dir, steps=3)
    config.num_devices = devices
    train_and_evaluate(config, str(tmp_path / f'devices_{devices}'))
    params.append(final_params(str(tmp_path / f'devices_{devices}')))
  assert_same(*params, exact=False)


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
  """2 processes x 4 CPU devices (gloo collectives) == 1 process x 8 devices after 3 steps."""
  base = [
    sys.executable,
    os.path.join(ROOT, 'experiments', 'main.py'),
    '--config',
    os.path.join(ROOT, 'configs', f'{name}.py'),
    f'--config.data_dir={data_dir}',
    '--config.num_train_steps=3',
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
      XLA_FLAGS=(
        f'--xla_force_host_platform_device_count={devices} --xla_cpu_collective_timeout_seconds=60'
      ),
    )

  run_processes([base + [f'--workdir={tmp_path / "one"}']], env(8))
  with socket.socket() as probe:  # a free port for the coordinator
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  run_processes(
    [
      base
      + [
        f'--workdir={tmp_path / "two"}',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ]
      for i in range(2)
    ],
    env(4),
  )
  assert_same(final_params(str(tmp_path / 'one')), final_params(str(tmp_path / 'two')), exact=False)
  one, two = (json.loads((tmp_path / d / 'results.json').read_text()) for d in ('one', 'two'))
  final, counted, loss = (
    ('final_eval', 'examples', 'loss') if name.startswith('resnet') else ('test', 'tokens', 'nll')
  )
  assert one[final][counted] == two[final][counted] > 0  # each evaluation example counted once
  assert one[final][loss] == pytest.approx(two[final][loss], rel=1e-5)


def test_demo_runs_both_methods_and_plots(data_dir, tmp_path):
  subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'experiments', 'demo.py'),
      f'--workdir={tmp_path}',
      f'--config.data_dir={data_dir}',
      '--config.num_train_steps=2',
      '--config.batch_size=16',
      '--config.model.width=4',
      '--config.eval_every_steps=1',
      '--config.log_every_steps=1',
      '--config.checkpoint_every_steps=0',
    ],
    check=True,
    cwd=ROOT,
    timeout=600,
    capture_output=True,
    env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''),
  )
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results) == {'dense', 'topkast'}
  assert [h['step'] for h in results['topkast']['history']] == [1, 2]
  assert results['dense']['forward_sparsity_measured']['kernels'] < 0.01
  assert results['topkast']['forward_sparsity_measured']['kernels'] > 0.5
  assert (tmp_path / 'accuracy.png').stat().st_size > 0
