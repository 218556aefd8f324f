"""What both experiment loops share: devices, data, models, sparsity, results."""

import concurrent.futures
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import topkast_jax
from topkast_jax import models
from topkast_jax.data import sources
from topkast_jax.training.state import first_replica, unreplicate

# Data sets that prepare in seconds without a network; others must be prepared beforehand.
AUTO_PREPARE = ('fashion_mnist', 'sotu')


def local_devices(config):
  """The devices this process feeds (``config.num_devices`` > 0 limits it, single-process)."""
  devices = jax.local_devices()
  if config.get('num_devices', 0):
    if jax.process_count() > 1:
      raise ValueError('num_devices limits devices only in single-process runs.')
    devices = devices[: config.num_devices]
  return devices


def pmap_devices(devices):
  """``devices`` for ``jax.pmap``: None (every device of every process) in multi-process runs.

  Passing only the local devices there would make each process reduce over its own devices.
  """
  return None if jax.process_count() > 1 else devices


def open_split(config, split):
  """A prepared split; prepares small offline data sets on first use."""
  data_dir = config.get('data_dir') or None
  try:
    return sources.data_source(config.dataset, split, data_dir)
  except FileNotFoundError:
    if not (config.get('prepare_data', True) and config.dataset in AUTO_PREPARE):
      raise
    if jax.process_index() == 0:
      sources.prepare(config.dataset, data_dir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f'prepared {config.dataset}')
    return sources.data_source(config.dataset, split, data_dir)


def build_model(config, num_outputs: int, bn_axis_name: str | None = 'batch'):
  """The model named by ``config.model.name``, and its Top-KAST sparsity overrides."""
  m = config.model
  resnets = {
    'resnet18': models.ResNet18,
    'resnet34': models.ResNet34,
    'resnet50': models.ResNet50,
    'resnet101': models.ResNet101,
  }
  if m.name in resnets:
    model = resnets[m.name](
      num_classes=num_outputs,
      width=m.get('width', 64),
      stem=m.get('stem', 'imagenet'),
      zero_init_last_bn=m.get('zero_init_last_bn', False),
      bn_axis_name=bn_axis_name,
      dtype=jnp.bfloat16 if config.get('half_precision') else jnp.float32,
    )
    overrides = models.resnet_sparsity() if config.sparsity.get('dense_first_last', True) else None
    return model, overrides
  if m.name == 'transformer_xl':
    model = models.TransformerXL(
      vocab_size=num_outputs,
      n_layer=m.n_layer,
      d_model=m.d_model,
      n_head=m.n_head,
      d_head=m.d_head,
      d_inner=m.d_inner,
      mem_len=m.mem_len,
      dropout=m.dropout,
      dropatt=m.dropatt,
      pre_norm=m.get('pre_norm', False),
      cutoffs=tuple(m.get('cutoffs', ())),
      div_val=m.get('div_val', 1),
      untie_r=m.get('untie_r', True),
    )
    return model, models.transformer_xl_sparsity()
  raise ValueError(f'unknown model.name {m.name!r}; use resnet18/34/50/101 or transformer_xl.')


def forward_sparsity(params, opt_state, sparse: bool) -> dict:
  """Measured share of exact zeros in the forward parameters: kernels, and all parameters."""
  used = topkast_jax.sparse_params(params, opt_state) if sparse else params
  leaves = jax.tree.leaves(used)
  kernels = [x for x in leaves if np.ndim(x) >= 2]
  zeros = lambda xs: sum(int(np.sum(np.asarray(x) == 0)) for x in xs)  # noqa: E731
  return {
    'kernels': zeros(kernels) / max(1, sum(np.size(x) for x in kernels)),
    'all_parameters': zeros(leaves) / max(1, sum(np.size(x) for x in leaves)),
  }


def topkast_scalars(opt_state) -> dict:
  """Top-KAST mask metrics (per layer and overall) from device 0's copy of the state."""
  return {
    k: float(v) for k, v in jax.device_get(jax.jit(topkast_jax.topkast_metrics)(opt_state)).items()
  }


class Prefetcher:
  """Loads ``dataset[step]`` for the next steps on background threads."""

  def __init__(self, dataset, start: int, stop: int, ahead: int = 2):
    self._dataset, self._stop = dataset, stop
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=ahead)
    self._pending = {
      s: self._pool.submit(dataset.__getitem__, s) for s in range(start, min(stop, start + ahead))
    }
    self._ahead = ahead

  def get(self, step: int):
    batch = self._pending.pop(step).result()
    following = step + self._ahead
    if following < self._stop:
      self._pending[following] = self._pool.submit(self._dataset.__getitem__, following)
    return batch

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)


def write_results(workdir: str, results: dict) -> None:
  """``workdir/results.json``, written atomically by process 0."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'results.json')
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  os.replace(path + '.tmp', path)


def due(done: int, every: int, total: int) -> bool:
  """Whether a periodic action (every ``every`` steps, 0 = never, and at the end) runs now."""
  return bool(every and done % every == 0) or done == total


def log_train(logger, done: int, metrics, state, sparse: bool) -> None:
  """Train metrics (pmapped) to every sink, and the Top-KAST mask metrics under Top-KAST."""
  metrics = unreplicate(metrics)
  logger.write(done, metrics, 'train')
  logger.progress(done, metrics)
  if sparse:
    logger.write(done, topkast_scalars(first_replica(state.opt_state)), 'topkast')


def summary(
  config,
  task: str,
  total_steps: int,
  start: int,
  seconds: float,
  history,
  final_state,
  sparse: bool,
  **extra,
) -> dict:
  """The fields of ``results.json`` both tasks share, plus ``extra``."""
  results = {
    'task': task,
    'dataset': config.dataset,
    'method': config.method,
    'steps': total_steps,
    'resumed_from_step': start,
    'train_seconds': seconds,
    **extra,
    'forward_sparsity_measured': forward_sparsity(
      final_state.params, final_state.opt_state, sparse
    ),
    'history': history,
    'config': config.to_dict(),
  }
  if sparse:
    results['topkast_metrics'] = {
      k: v for k, v in topkast_scalars(final_state.opt_state).items() if '/' not in k
    }
  return results
