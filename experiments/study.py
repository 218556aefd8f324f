"""Every method at several forward sparsities and seeds, on the real Fashion-MNIST.

Trains LeNet-300-100 (the quickstart's model; all three kernels sparse) dense once per seed
and with each sparse method at each forward sparsity, same data order, optimizer and schedule
(SGD, Nesterov momentum 0.9, warm-up then cosine decay). Writes to ``--out_dir``:
``runs.csv`` (one row per run), ``table.csv`` and ``table.md`` (mean and spread over seeds),
``runs.json`` (with histories) and ``accuracy_vs_sparsity.png``.

  python experiments/study.py --out_dir /tmp/topkast_study --seeds 0,1

Data: the Debian package ``dataset-fashion-mnist`` (no download).
"""

import csv
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import topkast_jax  # noqa: E402
from topkast_jax.data.idx import fashion_mnist_arrays  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ('dense', 'topkast', 'ste', 'static', 'set', 'rigl', 'magnitude_pruning')
_OUT = flags.DEFINE_string('out_dir', '/tmp/topkast_study', 'Where results go.')
_METHODS = flags.DEFINE_list('methods', list(METHODS), f'Any of {", ".join(METHODS)}.')
_SPARSITIES = flags.DEFINE_list('sparsities', ['0.8', '0.9', '0.95'], 'Forward sparsities.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (initialisation, data order, masks).')
_EPOCHS = flags.DEFINE_float('epochs', 10, 'Passes over the 60000 training images.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Training batch size.')
_LR = flags.DEFINE_float('learning_rate', 0.05, 'Peak learning rate (after 1/20 warm-up).')
_BACKWARD = flags.DEFINE_list(
  'backward', ['0.5', '0.8', '0.9'], 'Top-KAST backward sparsity, one per forward sparsity.'
)
_EVERY = flags.DEFINE_integer('update_every', 100, 'Top-KAST mask refresh interval.')
_L2 = flags.DEFINE_float('exploration_l2', 1e-4, 'Top-KAST exploration penalty.')
_MASK_EVERY = flags.DEFINE_integer('mask_update_every', 100, 'SET, RigL, pruning interval.')
_END = flags.DEFINE_float('end_fraction', 0.75, 'SET/RigL last update; pruning target reached.')


def mlp(params, x):
  """LeNet-300-100: 784-300-100-10, ReLU."""
  for i, layer in enumerate(params):
    x = x @ layer['kernel'] + layer['bias']
    x = jax.nn.relu(x) if i < len(params) - 1 else x
  return x


def init_mlp(seed: int, sizes=(784, 300, 100, 10)):
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  init = jax.nn.initializers.lecun_normal()
  return [
    {'kernel': init(k, (a, b)), 'bias': jnp.zeros(b)} for k, a, b in zip(keys, sizes, sizes[1:])
  ]


def load_data():
  train_x, train_y = fashion_mnist_arrays('train')
  test_x, test_y = fashion_mnist_arrays('test')
  mean, std = train_x.mean() / 255.0, train_x.std() / 255.0
  prep = lambda x: ((x.astype(np.float32) / 255.0 - mean) / std).reshape(len(x), -1)  # noqa: E731
  return (prep(train_x), train_y.astype(np.int32)), (prep(test_x), test_y.astype(np.int32))


def optimizer(method: str, sparsity: float, total: int, seed: int):
  schedule = optax.warmup_cosine_decay_schedule(0.0, _LR.value, max(1, total // 20), total)
  inner = optax.sgd(schedule, momentum=0.9, nesterov=True)
  end_step = max(1, round(_END.value * total))
  baseline = dict(sparsity_level=sparsity)
  if method == 'dense':
    return inner
  if method == 'topkast':
    backward = float(_BACKWARD.value[[float(s) for s in _SPARSITIES.value].index(sparsity)])
    return topkast_jax.topkast(
      inner,
      forward_sparsity=sparsity,
      backward_sparsity=backward,
      update_every=_EVERY.value,
      exploration_l2=_L2.value,
    )
  if method == 'ste':
    return topkast_jax.ste(inner, **baseline)
  if method == 'static':
    return topkast_jax.static_sparse(inner, seed=seed, **baseline)
  if method == 'magnitude_pruning':
    return topkast_jax.magnitude_pruning(
      inner, end_step=end_step, update_every=_MASK_EVERY.value, **baseline
    )
  grow = topkast_jax.rigl if method == 'rigl' else topkast_jax.set_sparse
  return grow(inner, end_step=end_step, update_every=_MASK_EVERY.value, seed=seed, **baseline)


def train_one(method: str, sparsity: float, seed: int, data) -> dict:
  (train_x, train_y), (test_x, test_y) = data
  steps_per_epoch = len(train_x) // _BATCH.value
  total = round(steps_per_epoch * _EPOCHS.value)
  tx = optimizer(method, sparsity, total, seed)
  sparse = method != 'dense'
  forward = topkast_jax.sparse_params if sparse else (lambda p, s: p)

  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(forward(params, state), x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def accuracy(params, state):
    return jnp.mean(jnp.argmax(mlp(forward(params, state), test_x), -1) == test_y)

  params = init_mlp(seed)
  state = tx.init(params)
  order_rng = np.random.default_rng(seed)
  history, timed_from, done = [], None, 0
  while done < total:
    order = order_rng.permutation(len(train_x))
    for i in range(min(steps_per_epoch, total - done)):
      idx = order[i * _BATCH.value : (i + 1) * _BATCH.value]
      params, state, loss = step(params, state, train_x[idx], train_y[idx])
      done += 1
      if done == 1:
        jax.block_until_ready(params)
        timed_from = time.perf_counter()  # steps/s without the first step's compilation
    history.append({'step': done, 'loss': float(loss), 'accuracy': float(accuracy(params, state))})
  seconds = time.perf_counter() - timed_from
  kernels = [k for k in jax.tree.leaves(forward(params, state)) if k.ndim == 2]
  row = {
    'method': method,
    'forward_sparsity': sparsity if sparse else 0.0,
    'seed': seed,
    'test_accuracy': history[-1]['accuracy'],
    'steps_per_second': (total - 1) / seconds,
    'measured_sparsity': sum(int(jnp.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels),
    'steps': total,
  }
  if sparse:
    metrics = topkast_jax.sparsity_metrics(state, per_leaf=False)
    row['forward_change'] = float(metrics['forward_change'])
  return {**row, 'history': history}


def summarise(runs: list[dict]) -> list[dict]:
  table = []
  for method in _METHODS.value:
    for sparsity in sorted({r['forward_sparsity'] for r in runs if r['method'] == method}):
      group = [r for r in runs if r['method'] == method and r['forward_sparsity'] == sparsity]
      accuracy = np.array([r['test_accuracy'] for r in group])
      table.append(
        {
          'method': method,
          'forward_sparsity': sparsity,
          'seeds': len(group),
          'test_accuracy_mean': float(accuracy.mean()),
          'test_accuracy_std': float(accuracy.std(ddof=1)) if len(group) > 1 else 0.0,
          'steps_per_second': float(np.mean([r['steps_per_second'] for r in group])),
          'measured_sparsity': float(np.mean([r['measured_sparsity'] for r in group])),
        }
      )
  return table


def write_csv(path: str, rows: list[dict]) -> None:
  fields = list(dict.fromkeys(k for r in rows for k in r if k != 'history'))
  with open(path + '.tmp', 'w', newline='') as f:
    writer = csv.DictWriter(f, fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(path + '.tmp', path)


def markdown(table: list[dict]) -> str:
  lines = [
    '| method | forward sparsity | test accuracy (mean +- std) | seeds | steps/s | measured sparsity |',
    '|---|---|---|---|---|---|',
  ]
  for r in table:
    lines.append(
      f'| {r["method"]} | {r["forward_sparsity"]:g} | {100 * r["test_accuracy_mean"]:.2f} +- '
      f'{100 * r["test_accuracy_std"]:.2f} | {r["seeds"]} | {r["steps_per_second"]:.0f} | '
      f'{r["measured_sparsity"]:.4f} |'
    )
  return '\n'.join(lines) + '\n'


def plot(table: list[dict], path: str) -> None:
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for method in _METHODS.value:
    rows = [r for r in table if r['method'] == method]
    if method == 'dense':
      for r in rows:
        ax.axhline(100 * r['test_accuracy_mean'], color='k', ls='--', label='dense')
      continue
    ax.errorbar(
      [r['forward_sparsity'] for r in rows],
      [100 * r['test_accuracy_mean'] for r in rows],
      yerr=[100 * r['test_accuracy_std'] for r in rows],
      marker='o',
      capsize=3,
      label=method,
    )
  ax.set_xlabel('forward sparsity')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('LeNet-300-100 on Fashion-MNIST')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  unknown = set(_METHODS.value) - set(METHODS)
  if unknown:
    raise app.UsageError(f'unknown --methods {sorted(unknown)}; use any of {", ".join(METHODS)}.')
  if len(_BACKWARD.value) != len(_SPARSITIES.value):
    raise app.UsageError('--backward needs one value per --sparsities value.')
  os.makedirs(_OUT.value, exist_ok=True)
  data = load_data()
  plan = [
    (m, float(s), int(seed))
    for seed in _SEEDS.value
    for m in _METHODS.value
    for s in (['0'] if m == 'dense' else _SPARSITIES.value)
  ]
  runs, started = [], time.perf_counter()
  for i, (method, sparsity, seed) in enumerate(plan, 1):
    run = train_one(method, sparsity, seed, data)
    runs.append(run)
    elapsed = time.perf_counter() - started
    print(
      f'[{i}/{len(plan)}] {method} {sparsity:g} seed {seed}: test accuracy '
      f'{run["test_accuracy"]:.4f}, {run["steps_per_second"]:.0f} steps/s, measured sparsity '
      f'{run["measured_sparsity"]:.4f}; ETA {elapsed / i * (len(plan) - i) / 60:.1f} min',
      flush=True,
    )
  table = summarise(runs)
  write_csv(os.path.join(_OUT.value, 'runs.csv'), runs)
  write_csv(os.path.join(_OUT.value, 'table.csv'), table)
  with open(os.path.join(_OUT.value, 'runs.json'), 'w') as f:
    json.dump({'flags': flags.FLAGS.flag_values_dict(), 'runs': runs}, f, indent=1, default=str)
  with open(os.path.join(_OUT.value, 'table.md'), 'w') as f:
    f.write(markdown(table))
  plot(table, os.path.join(_OUT.value, 'accuracy_vs_sparsity.png'))
  print(markdown(table))
  print(f'{len(runs)} runs in {(time.perf_counter() - started) / 60:.1f} min; wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
