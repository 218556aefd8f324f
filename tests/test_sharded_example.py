"""examples/sharded_step.py trains for real on 8 fake devices with FSDP-sharded parameters."""

import os
import re
import subprocess
import sys

import pytest

from topkast_jax.data.idx import DEBIAN_FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
  not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
  reason='Debian package dataset-fashion-mnist is not installed',
)
def test_sharded_example_learns_sparse_on_eight_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  run = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'examples', 'sharded_step.py'), '--steps=100'],
    check=True,
    env=env,
    timeout=600,
    capture_output=True,
    text=True,
  )
  out = run.stdout
  assert "devices: 8; dense_0 kernel (784, 512) as P('data', None)" in out
  assert 'forward density 0.1000' in out
  accuracy = float(re.search(r'test accuracy \(sparse model\): ([\d.]+)', out).group(1))
  assert accuracy > 0.75  # chance is 0.10
