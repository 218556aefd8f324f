"""Per-step cost of Top-KAST against dense training, for a small CNN and an MLP.

Each configuration jits a whole train step (forward, backward, optimizer, apply). Rounds
interleave the configurations so machine noise hits them alike; each round times
``--steps`` consecutive steps (so refreshes every 100 steps are included at their real rate),
and the median over rounds is reported as milliseconds per step and as a ratio to dense.
Top-KAST adds a few elementwise passes over the parameters per step (mask the forward
weights, restrict the gradient, mask the update), so its ratio falls as the work per
parameter (batch size, spatial size) grows; a batch-64 MLP step is mostly such passes.

  python benchmarks/step_overhead.py [--rounds 7] [--steps 200]
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import topkast_jax


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(512)(x))
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(10)(x)


def make_steps(model, params):
  def loss_fn(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def optimizer():
    return optax.sgd(0.05, momentum=0.9, nesterov=True)

  dense_tx = optimizer()

  @jax.jit
  def dense_step(p, s, x, y):
    grads = jax.grad(loss_fn)(p, x, y)
    updates, s = dense_tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  steps = {'dense': (dense_step, dense_tx.init(params))}
  for every in (100, 1):
    tx = topkast_jax.topkast(
      optimizer(),
      forward_sparsity=0.9,
      backward_sparsity=0.8,
      update_every=every,
      exploration_l2=1e-4,
    )

    @jax.jit
    def sparse_step(p, s, x, y, tx=tx):
      grads = jax.grad(loss_fn)(topkast_jax.sparse_params(p, s), x, y)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    steps[f'topkast_every_{every}'] = (sparse_step, tx.init(params))
  return steps


def time_steps(step, params, state, x, y, n):
  start = time.perf_counter()
  for _ in range(n):
    params, state = step(params, state, x, y)
  jax.block_until_ready(params)
  return (time.perf_counter() - start) / n, params, state


def benchmark(name, model, x, y, rounds, n):
  params = model.init(jax.random.key(0), x)['params']
  size = sum(p.size for p in jax.tree.leaves(params))
  steps = make_steps(model, params)
  carry = {k: (params, s) for k, (_, s) in steps.items()}
  times = {k: [] for k in steps}
  for k, (step, _) in steps.items():  # compile and warm up
    _, *carry[k] = time_steps(step, *carry[k], x, y, 2)
  for _ in range(rounds):
    for k, (step, _) in steps.items():
      seconds, *carry[k] = time_steps(step, *carry[k], x, y, n)
      times[k].append(seconds)
  dense = statistics.median(times['dense'])
  print(f'{name}: {size:,} parameters, batch {x.shape[0]}, {rounds} rounds x {n} steps')
  for k, ts in times.items():
    median = statistics.median(ts)
    print(f'  {k:18s} {median * 1e3:8.3f} ms/step  ratio_vs_dense={median / dense:.3f}')
  return {k: statistics.median(ts) / dense for k, ts in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--cnn-batch', type=int, default=64)
  parser.add_argument('--mlp-batch', type=int, default=256)
  args = parser.parse_args()
  rng = np.random.default_rng(0)

  def data(batch):
    return (
      jnp.asarray(rng.standard_normal((batch, 28, 28, 1)), jnp.float32),
      jnp.asarray(rng.integers(0, 10, batch)),
    )

  print(f'jax {jax.__version__} on {jax.devices()[0].platform}')
  cnn = benchmark('small CNN', SmallCNN(), *data(args.cnn_batch), args.rounds, args.steps)
  mlp = benchmark('MLP', MLP(), *data(args.mlp_batch), args.rounds, args.steps)
  for every in (100, 1):
    key = f'topkast_every_{every}'
    print(f'ratio_every_{every}: cnn={cnn[key]:.3f} mlp={mlp[key]:.3f}')


if __name__ == '__main__':
  main()
