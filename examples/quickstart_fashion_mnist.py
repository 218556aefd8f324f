"""Quickstart: LeNet-300-100 on Fashion-MNIST, dense and Top-KAST trained side by side.

Reads the real data set from the Debian package ``dataset-fashion-mnist`` (no download),
trains both models with the same seed, data order and optimizer, evaluates the test set
after each epoch (Top-KAST on its sparse parameters), and writes ``results.json`` and
``accuracy.png`` to ``--out_dir``.

  python examples/quickstart_fashion_mnist.py --out_dir /tmp/topkast_quickstart
"""

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from absl import app, flags, logging

import topkast_jax
from topkast_jax.data.idx import fashion_mnist_arrays

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

_OUT = flags.DEFINE_string('out_dir', '/tmp/topkast_quickstart', 'Where results go.')
_EPOCHS = flags.DEFINE_integer('epochs', 10, 'Passes over the 60000 training images.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Training batch size.')
_LR = flags.DEFINE_float('learning_rate', 0.05, 'SGD (Nesterov momentum 0.9) learning rate.')
_FWD = flags.DEFINE_float('forward_sparsity', 0.9, 'Top-KAST forward sparsity.')
_BWD = flags.DEFINE_float('backward_sparsity', 0.8, 'Top-KAST backward sparsity.')
_EVERY = flags.DEFINE_integer('update_every', 1, 'Top-KAST mask refresh interval.')
_L2 = flags.DEFINE_float('exploration_l2', 1e-4, 'Top-KAST exploration penalty lambda.')
_COMPACT = flags.DEFINE_bool(
  'compact_inner_state', False, "Top-KAST keeps the optimizer's state for B's weights only."
)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for initialisation and data order.')


class LeNet300100(nn.Module):
  """The classic 784-300-100-10 MLP of the pruning literature."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(300)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(10)(x)


def load_data():
  train_x, train_y = fashion_mnist_arrays('train')
  test_x, test_y = fashion_mnist_arrays('test')
  mean, std = train_x.mean() / 255.0, train_x.std() / 255.0
  prep = lambda x: (x.astype(np.float32) / 255.0 - mean) / std  # noqa: E731
  return (prep(train_x), train_y.astype(np.int32)), (prep(test_x), test_y.astype(np.int32))


def train(method, model, params, train_data, test_data):
  """Trains one model; returns its history and final measurements."""
  tx = optax.sgd(_LR.value, momentum=0.9, nesterov=True)
  if method == 'topkast':
    tx = topkast_jax.topkast(
      tx,
      forward_sparsity=_FWD.value,
      backward_sparsity=_BWD.value,
      update_every=_EVERY.value,
      exploration_l2=_L2.value,
      compact_inner_state=_COMPACT.value,
    )
  forward_params = topkast_jax.sparse_params if method == 'topkast' else (lambda p, s: p)

  def loss_fn(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(p, s, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(forward_params(p, s), x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  @jax.jit
  def test_accuracy(p, s):
    logits = model.apply({'params': forward_params(p, s)}, test_data[0])
    return jnp.mean(jnp.argmax(logits, -1) == test_data[1])

  state = tx.init(params)
  x_all, y_all = train_data
  steps_per_epoch = len(x_all) // _BATCH.value
  total = steps_per_epoch * _EPOCHS.value
  order_rng = np.random.default_rng(_SEED.value)
  history, start, step = [], time.perf_counter(), 0
  for epoch in range(1, _EPOCHS.value + 1):
    order = order_rng.permutation(len(x_all))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * _BATCH.value : (i + 1) * _BATCH.value]
      params, state, loss = train_step(params, state, x_all[idx], y_all[idx])
      losses.append(loss)
      step += 1
    accuracy = float(test_accuracy(params, state))
    elapsed = time.perf_counter() - start
    history.append(
      {
        'epoch': epoch,
        'step': step,
        'train_loss': float(np.mean(losses)),
        'test_accuracy': accuracy,
      }
    )
    print(
      f'[{method:7s}] epoch {epoch:2d}/{_EPOCHS.value} step {step:5d}/{total} '
      f'loss {history[-1]["train_loss"]:.4f} test acc {accuracy:.4f} '
      f'{step / elapsed:6.1f} steps/s ETA {(total - step) * elapsed / step:5.1f} s',
      flush=True,
    )
  used = forward_params(params, state)
  kernels = [k for k in jax.tree.leaves(used) if k.ndim >= 2]
  zeros = sum(int(jnp.sum(k == 0)) for k in kernels)
  result = {
    'final_test_accuracy': history[-1]['test_accuracy'],
    'kernel_forward_sparsity': zeros / sum(k.size for k in kernels),
    'seconds': time.perf_counter() - start,
    'history': history,
  }
  if method == 'topkast':
    metrics = topkast_jax.sparsity_metrics(state, per_leaf=False)
    result['sparsity_metrics'] = {k: float(v) for k, v in metrics.items()}
  return result


def plot(results, path):
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, r in results.items():
    ax.plot(
      [h['step'] for h in r['history']],
      [h['test_accuracy'] for h in r['history']],
      marker='o',
      label=f'{method} ({r["final_test_accuracy"]:.4f})',
    )
  ax.set_xlabel('training step')
  ax.set_ylabel('test accuracy')
  ax.set_title(f'LeNet-300-100 on Fashion-MNIST; Top-KAST {_FWD.value:g} / {_BWD.value:g}')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # progress and results, not jax's backend INFO lines
  os.makedirs(_OUT.value, exist_ok=True)
  train_data, test_data = load_data()
  model = LeNet300100()
  params = model.init(jax.random.key(_SEED.value), train_data[0][:1])['params']
  results = {m: train(m, model, params, train_data, test_data) for m in ('dense', 'topkast')}
  config = {
    'epochs': _EPOCHS.value,
    'batch_size': _BATCH.value,
    'learning_rate': _LR.value,
    'forward_sparsity': _FWD.value,
    'backward_sparsity': _BWD.value,
    'update_every': _EVERY.value,
    'exploration_l2': _L2.value,
    'seed': _SEED.value,
  }
  with open(os.path.join(_OUT.value, 'results.json'), 'w') as f:
    json.dump({'config': config, 'results': results}, f, indent=2)
  plot(results, os.path.join(_OUT.value, 'accuracy.png'))
  for method, r in results.items():
    print(
      f'{method:7s}: final test accuracy {r["final_test_accuracy"]:.4f}, '
      f'kernel forward sparsity {r["kernel_forward_sparsity"]:.4f}, {r["seconds"]:.1f} s'
    )
  print(f'wrote {_OUT.value}/results.json and {_OUT.value}/accuracy.png')


if __name__ == '__main__':
  app.run(main)
