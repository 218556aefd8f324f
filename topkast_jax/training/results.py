"""What a run reports: measured sparsity, the method's mask metrics, and ``results.json``."""

import json
import os

import jax
import numpy as np

import topkast_jax
from topkast_jax.atomic import atomic_file


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


def mask_metrics(opt_state) -> dict:
  """The method's mask metrics (per layer and overall) as Python floats."""
  metrics = jax.jit(topkast_jax.sparsity_metrics)(opt_state)
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluation_sums(p_eval, state, carry, batches) -> dict:
  """The pmapped ``p_eval``'s psummed outputs, added up over ``batches``."""
  totals = {}
  for batch in batches:
    carry, sums = p_eval(state, carry, batch)
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v[0])
  return totals


def summary(config, task, start: int, seconds: float, history, state, sparse: bool, **extra):
  """The contents of ``results.json``."""
  results = {
    'task': task.name,
    'dataset': config.dataset,
    'method': config.method,
    'steps': task.total_steps,
    'resumed_from_step': start,
    'train_seconds': seconds,
    **extra,
    'forward_sparsity_measured': forward_sparsity(state.params, state.opt_state, sparse),
    'history': history,
    'config': config.to_dict(),
  }
  if sparse:
    metrics = mask_metrics(state.opt_state).items()
    results['sparsity_metrics'] = {k: v for k, v in metrics if '/' not in k}
  return results


def finished_run(workdir: str, config, total_steps: int, restored) -> dict | None:
  """The saved ``results.json`` when ``restored`` (the newest checkpoint, or None) is the end of
  this very run and the file reports it; else None (the run trains or evaluates as usual)."""
  path = os.path.join(workdir, 'results.json')
  if restored is None or restored[0] != total_steps or not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None  # unreadable: evaluated and written again
  as_saved = json.loads(json.dumps(config.to_dict()))  # tuples become lists, as in the file
  same = saved.get('config') == as_saved and saved.get('steps') == total_steps
  return saved if same else None


def write_json(path: str, results: dict) -> None:
  """``path`` written atomically by process 0."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with atomic_file(path, encoding='utf-8') as f:
    json.dump(results, f, indent=2)
