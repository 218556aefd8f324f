"""The experiment driver: every config and every method runs, and the demo (devices and
processes: test_multiprocess.py)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from experiment_utils import tiny_config, xla_flags

from topkast_jax.data import sources
from topkast_jax.methods import METHODS
from topkast_jax.training.train import train_and_evaluate

pytestmark = pytest.mark.usefixtures('one_block_resnets')  # in-process runs; scripts run full depth
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
      sources,
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
  assert any('sparsity/forward_density' in line for line in metrics)
  density = results['sparsity_metrics']['forward_density']
  assert density == pytest.approx(1 - config.sparsity.forward, abs=0.01)
  if config.task == 'image_classification':
    expected = 20 if config.dataset == 'fashion_mnist' else 16
    assert results['final_eval']['examples'] == expected
    assert np.isfinite(results['final_eval']['loss'])
  else:
    assert np.isfinite(results['test']['bits_per_token'])
    assert results['test']['tokens'] > 0
  assert os.listdir(tmp_path / 'tensorboard')


@pytest.mark.parametrize(
  'name, method',
  [('resnet_fashion_mnist', m) for m in METHODS if m != 'dense']
  + [('transformer_xl_sotu', 'rigl')],
)
def test_every_method_trains_through_the_driver(name, method, data_dir, tmp_path):
  config = tiny_config(name, data_dir, steps=4)
  config.method = method
  config.sparsity.update(
    forward=0.9,
    backward=0.8,  # B twice A: no stale-refresh warning at update_every=2
    update_every=2,
    mask_update_every=2,
    end_fraction=0.75,
    drop_fraction=0.5,
  )
  results = train_and_evaluate(config, str(tmp_path))
  assert results['method'] == method
  measured = results['forward_sparsity_measured']['kernels']
  metrics = results['sparsity_metrics']
  assert metrics['forward_density'] == pytest.approx(0.1, abs=0.005)  # every method ends at 0.9
  assert measured > 0.5  # the first and last ResNet layers and TXL's embeddings stay dense
  if method in ('set', 'rigl'):  # a cosine share (1/8) of the mask replaced at step 2
    assert metrics['forward_change'] > 0
  if method in ('static', 'magnitude_pruning'):  # never grow
    assert metrics['forward_change'] == 0


def test_demo_runs_both_methods_and_plots(data_dir, tmp_path):
  run = subprocess.run(
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
    text=True,
    env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags()),
  )
  console = (run.stdout + run.stderr).splitlines()
  assert not [line for line in console if re.match(r'I\d{4} ', line)]  # no library INFO lines
  assert any(line.startswith('[topkast] eval at step 2: accuracy') for line in console)
  steps = [line for line in console if line.startswith('[topkast] step 1/2 ')]
  assert len(steps) == 1 and ' batch_accuracy ' in steps[0] and ' batch_loss ' in steps[0]
  assert not [line for line in console if 'OpenCV' in line]  # tfds' advice: a library warning
  log = (tmp_path / 'log_0.txt').read_text()
  assert 'INFO' in log and 'checkpoint' in log  # orbax's INFO lines went to the file
  assert 'OpenCV is not installed' in log  # kept in the file
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results) == {'dense', 'topkast'}
  assert [h['step'] for h in results['topkast']['history']] == [1, 2]
  assert results['dense']['forward_sparsity_measured']['kernels'] < 0.01
  assert results['topkast']['forward_sparsity_measured']['kernels'] > 0.5
  assert (tmp_path / 'accuracy.png').stat().st_size > 0
