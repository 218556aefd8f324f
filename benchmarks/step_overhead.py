"""Per-step cost of Top-KAST against dense training, for the models of the configs and two toys.

Each configuration jits a whole train step (forward, backward, optimizer, apply). Rounds
interleave dense and sparse so machine noise hits them alike; each round times ``steps``
consecutive steps, and the median over rounds is reported as milliseconds per step and as a
ratio to dense. Models, with the sparsity, optimizer and batch of their config:

* ``resnet``: the quarter-width ResNet-18 of ``configs/resnet_fashion_mnist.py`` (0.8 / 0.5,
  first conv and head dense, SGD Nesterov, batch 128 of 28x28);
* ``transformer_xl``: the 2-layer Transformer-XL of ``configs/transformer_xl_sotu.py``
  (0.8 / 0, attention and feed-forward kernels sparse, Adam, 16 x 128 tokens, memory 128);
* ``cnn`` and ``mlp``: a small CNN (batch 64) and a 784-512-512-10 MLP (batch 256), 0.9 / 0.8
  with the exploration penalty, SGD momentum; a batch-256 MLP step is mostly elementwise
  passes over the weights, the worst case for Top-KAST's extra passes.

Top-KAST refreshes its masks every step (the default) and, for comparison, every 100 steps.
Structured, every step: 4 x 2 blocks at the model's sparsities (``topkast_blocks_4x2``), and
N:M 2:4 with B 3:4 (``topkast_nm_2:4``) beside unstructured Top-KAST at the same 0.5 / 0.25
(``topkast_0.5``); a leaf the structure does not tile (a conv with one input channel) stays
unstructured. After each model, the refresh on its own per sparse weight, next to one
compare-and-count pass, and the count passes its threshold searches took per leaf (A, B).
Random inputs: only the time is measured.

  python benchmarks/step_overhead.py [--rounds 5] [--models resnet,transformer_xl,cnn,mlp]
"""

import argparse
import statistics
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import topkast_jax
from topkast_jax import models
from topkast_jax.sparsity import is_dense
from topkast_jax.topk import _search_from, magnitude_keys, refreshed_masks


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


def classifier(model, batch, rng):
  """(loss_fn(params, batch), params, batch) of an image classifier on random images."""
  x = jnp.asarray(rng.standard_normal((batch, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch))
  variables = model.init(jax.random.key(0), x)
  params, extra = variables['params'], {k: v for k, v in variables.items() if k != 'params'}

  def loss_fn(p, data):
    if extra:  # BatchNorm in training mode; its running statistics are not carried
      logits, _ = model.apply({'params': p, **extra}, data[0], train=True, mutable=list(extra))
    else:
      logits = model.apply({'params': p}, data[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, data[1]).mean()

  return loss_fn, params, (x, y)


def transformer_xl(rng):
  config = dict(n_layer=2, d_model=256, n_head=4, d_head=64, d_inner=1024, mem_len=128)
  model = models.TransformerXL(vocab_size=256, dropout=0.0, **config)
  tokens = jnp.asarray(rng.integers(0, 256, (16, 129)), jnp.int32)
  mems = tuple(jnp.asarray(rng.standard_normal((16, 128, 256)), jnp.float32) for _ in range(2))
  params = model.init(jax.random.key(0), tokens[:, :-1])['params']

  def loss_fn(p, data):
    tokens, mems = data
    log_probs, _ = model.apply({'params': p}, tokens[:, :-1], mems)
    targets = tokens[:, 1:, None]
    return -jnp.take_along_axis(log_probs, targets, axis=-1).mean()

  return loss_fn, params, (tokens, mems)


MODELS = ('resnet', 'transformer_xl', 'cnn', 'mlp')


def setup(name, rng):
  """(loss_fn, params, batch, optimizer, topkast keyword arguments) of one model."""
  sgd = lambda: optax.sgd(0.05, momentum=0.9, nesterov=True)  # noqa: E731
  toy = dict(forward_sparsity=0.9, backward_sparsity=0.8, exploration_l2=1e-4)
  resnet = models.ResNet18(num_classes=10, width=16, stem='small', zero_init_last_bn=True)
  make = {
    'resnet': lambda: (
      *classifier(resnet, 128, rng),
      sgd,
      dict(
        forward_sparsity=0.8,
        backward_sparsity=0.5,
        exploration_l2=1e-4,
        sparsity=models.resnet_sparsity(),
      ),
    ),
    'transformer_xl': lambda: (
      *transformer_xl(rng),
      lambda: optax.adam(5e-4),
      dict(forward_sparsity=0.8, backward_sparsity=0.0, sparsity=models.transformer_xl_sparsity()),
    ),
    'cnn': lambda: (*classifier(SmallCNN(), 64, rng), sgd, toy),
    'mlp': lambda: (*classifier(MLP(), 256, rng), sgd, toy),
  }
  return make[name]()


def structured_variants(sparse_kwargs):
  """name -> Top-KAST keyword arguments of the structured steps (and their unstructured
  comparison)."""
  overrides = sparse_kwargs.get('sparsity')
  half = {**sparse_kwargs, 'forward_sparsity': 0.5, 'backward_sparsity': 0.25}
  return {
    'topkast_blocks_4x2': {
      **sparse_kwargs,
      'sparsity': topkast_jax.where_structure_fits(topkast_jax.Blocks(4, 2), overrides),
    },
    'topkast_nm_2:4': {
      **half,
      'sparsity': topkast_jax.where_structure_fits(topkast_jax.NM(2, 4), overrides),
    },
    'topkast_0.5': half,
  }


def make_steps(loss_fn, params, optimizer, sparse_kwargs):
  """name -> (jitted step(params, state, batch), initial state)."""
  dense_tx = optimizer()

  @jax.jit
  def dense_step(p, s, batch):
    updates, s = dense_tx.update(jax.grad(loss_fn)(p, batch), s, p)
    return optax.apply_updates(p, updates), s

  steps = {'dense': (dense_step, dense_tx.init(params))}
  variants = {
    f'topkast_every_{every}': dict(sparse_kwargs, update_every=every) for every in (1, 100)
  }
  for name, kwargs in {**variants, **structured_variants(sparse_kwargs)}.items():
    with warnings.catch_warnings():  # a 100-step refresh at 0.8 / 0 warns; timed all the same
      warnings.simplefilter('ignore', UserWarning)
      tx = topkast_jax.topkast(optimizer(), **kwargs)

    @jax.jit
    def sparse_step(p, s, batch, tx=tx):
      grads = jax.grad(loss_fn)(topkast_jax.sparse_params(p, s), batch)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    steps[name] = (sparse_step, tx.init(params))
  return steps


def time_steps(step, params, state, batch, n):
  start = time.perf_counter()
  for _ in range(n):
    params, state = step(params, state, batch)
  jax.block_until_ready(params)
  return (time.perf_counter() - start) / n, params, state


def median_seconds(fn, rounds, n):
  """Median over ``rounds`` of the mean time of ``n`` calls of ``fn`` (after one warm-up)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(n):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / n)
  return statistics.median(times)


def refresh_per_weight(step, params, state, batch, sparse_kwargs, rounds, n):
  """Prints the refresh on its own per sparse weight, the next step's from the last thresholds
  (``params`` and ``state`` after the timed rounds, so weights move as in training), next to the
  floor: one fused compare-and-count pass over the same leaves."""
  after, _ = step(params, state, batch)
  specs = topkast_jax.resolve_sparsities(
    params,
    sparse_kwargs['forward_sparsity'],
    sparse_kwargs['backward_sparsity'],
    sparse_kwargs.get('sparsity'),
  )
  sparse = [
    (x, t, spec)
    for x, t, spec in zip(
      jax.tree.leaves(after),
      jax.tree.leaves(state.thresholds, is_leaf=is_dense),
      jax.tree.leaves(specs, is_leaf=is_dense),
    )
    if not is_dense(spec)
  ]
  refresh = jax.jit(
    lambda ts: [
      refreshed_masks(magnitude_keys(x), s.layer_counts(x.shape), t, layer_axes=s.layer_axes)
      for (x, _, s), t in zip(sparse, ts)
    ]
  )
  xs, ts = [x for x, _, _ in sparse], [t for _, t, _ in sparse]
  one_pass = jax.jit(lambda xs: [jnp.sum(jnp.abs(x) >= 0.01, dtype=jnp.int32) for x in xs])
  seconds = {
    'refresh': median_seconds(lambda: refresh(ts), rounds, n),
    'one_pass': median_seconds(lambda: one_pass(xs), rounds, n),
  }
  weights = sum(x.size for x in xs)
  per_weight = {k: v / weights * 1e9 for k, v in seconds.items()}
  print(
    f'  refresh {per_weight["refresh"]:.3f} ns/weight, one compare-and-count pass '
    f'{per_weight["one_pass"]:.3f} ns/weight over the {weights:,} sparse weights: '
    f'ratio_refresh_vs_one_pass={seconds["refresh"] / seconds["one_pass"]:.3f}'
  )
  print(f"  count passes of that refresh's searches, per leaf: {search_probes(sparse)}")


def search_probes(sparse) -> str:
  """Probes (one compare-and-count pass each) of the search from the last thresholds, per
  unstacked leaf, for A and B; '+' marks a search that fell back to the full one."""
  probes = {'A': [], 'B': []}
  for x, t, s in sparse:
    ks = s.layer_counts(x.shape)
    for j, (name, k) in enumerate(zip(probes, ks)):
      if s.layer_axes == 0 and 0 < k < x.size:
        _, _, settled, n = _search_from(magnitude_keys(x), k, t[0, j], t[1, j], max_probes=16)
        probes[name].append(f'{int(n)}{"" if settled else "+"}')
  return ', '.join(f'{name} {"/".join(v) or "none (no search)"}' for name, v in probes.items())


def benchmark(name, loss_fn, params, batch, optimizer, sparse_kwargs, rounds, seconds):
  steps = make_steps(loss_fn, params, optimizer, sparse_kwargs)
  carry = {k: (params, s) for k, (_, s) in steps.items()}
  for k, (step, _) in steps.items():  # compile and warm up
    _, *carry[k] = time_steps(step, *carry[k], batch, 2)
  dense_step_seconds, *carry['dense'] = time_steps(steps['dense'][0], *carry['dense'], batch, 3)
  n = max(3, round(seconds / dense_step_seconds))  # steps per round: about `seconds` of dense
  times = {k: [] for k in steps}
  for _ in range(rounds):
    for k, (step, _) in steps.items():
      elapsed, *carry[k] = time_steps(step, *carry[k], batch, n)
      times[k].append(elapsed)
  dense = statistics.median(times['dense'])
  size = sum(p.size for p in jax.tree.leaves(params))
  print(f'{name}: {size:,} parameters, {rounds} rounds x {n} steps')
  for k, ts in times.items():
    median = statistics.median(ts)
    print(f'  {k:18s} {median * 1e3:9.3f} ms/step  ratio_vs_dense={median / dense:.3f}')
  refresh_per_weight(
    steps['topkast_every_1'][0], *carry['topkast_every_1'], batch, sparse_kwargs, rounds, n
  )
  return {k: statistics.median(ts) / dense for k, ts in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--seconds', type=float, default=1.5, help='per round and configuration')
  parser.add_argument('--models', default='resnet,transformer_xl,cnn,mlp')
  args = parser.parse_args()
  chosen = args.models.split(',')
  unknown = sorted(set(chosen) - set(MODELS))
  if unknown:
    parser.error(f'unknown models {unknown}; choose from {", ".join(MODELS)}')
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)')
  rng = np.random.default_rng(0)
  ratios = {m: benchmark(m, *setup(m, rng), args.rounds, args.seconds) for m in chosen}
  for every in (1, 100):
    key = f'topkast_every_{every}'
    print(f'ratio_every_{every}: ' + ' '.join(f'{m}={r[key]:.3f}' for m, r in ratios.items()))
  for key in structured_variants({}):
    print(f'ratio_{key}: ' + ' '.join(f'{m}={r[key]:.3f}' for m, r in ratios.items()))


if __name__ == '__main__':
  main()
