"""Helpers for the driver tests (tiny configs, a workdir's last checkpoint) and for running
the repository's scripts."""

import importlib
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RESNET = dict(width=4)
TINY_TXL = dict(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=8)


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
    if config.model.cutoffs:
      config.model.cutoffs = (4, 8)
      config.model.div_val = 2
  return config


def last_checkpoint(workdir, items=('state',)):
  """The items of the newest checkpoint in ``workdir``, as saved (no template)."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  args = ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in items})
  restored = manager.restore(manager.latest_step(), args=args)
  manager.close()
  return {k: restored[k] for k in items}


def final_params(workdir):
  return last_checkpoint(workdir)['state']['params']


def assert_same(a, b, exact=True, rtol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


def xla_flags(devices: int = 1) -> str:
  """XLA flags for a script the tests run, on ``devices`` CPU devices: this run's (conftest.py),
  with LLVM's optimisations off. The scripts' programs then compile about 15% faster (measured
  on the driver tests), and every comparison of two runs of scripts compiles both alike. (Not
  in the test processes themselves: equal bit for bit there means equal with default flags.)"""
  flag = '--xla_force_host_platform_device_count'
  flags = re.sub(f'{flag}=\\d+', f'{flag}={devices}', os.environ['XLA_FLAGS'])
  return f'{flags} --xla_backend_optimization_level=0'.strip()


def run_script(path: str, *args, devices: int = 1) -> str:
  """stdout of ``python <repository>/<path> args`` on ``devices`` fake CPU devices (raises on
  failure)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=xla_flags(devices),
  )
  done = subprocess.run(
    [sys.executable, os.path.join(ROOT, path), *args],
    check=True,
    env=env,
    timeout=900,
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  return done.stdout
