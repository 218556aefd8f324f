"""Bytes of Top-KAST's optimizer state against plain Adam and SGD momentum, and the step time of
the compact inner state against the dense-state path.

Memory: the whole optimizer state, counted from ``jax.eval_shape`` (nothing is allocated), for
the models of ``configs/``: ResNet-50 (ImageNet, first conv and head dense) and the paper's two
Transformer-XLs (enwik8: 24 layers, d_model 1024, d_ff 3072, 256 bytes; WikiText-103: 18
layers, d_model 1024, d_ff 4096, 267,735 words, adaptive embedding and softmax), at forward / backward sparsity 0.8 / 0.5,
0.9 / 0.8 and 0.95 / 0.9. Three Top-KAST states: ``bool masks`` (the state before masks were
packed: A and B one byte per weight, the optimizer's state dense), ``dense state`` (masks as
bits) and ``compact`` (``compact_inner_state=True``: the optimizer's state and B's indices for
the |B| weights only). Ratios are to the plain optimizer's state.

Time: jitted train steps of the step_overhead models at 0.9 / 0.8 (refresh every step), plain,
Top-KAST dense-state and compact, interleaved in rounds; medians and ratios to the dense-state
path. Writes ``state_memory.json`` to ``--out_dir``.

  python benchmarks/state_memory.py [--time_models mlp,transformer_xl] [--rounds 5]
"""

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from step_overhead import setup, time_steps

import topkast_jax
from topkast_jax import bitmask, models
from topkast_jax.states import is_masked

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import resnet50_imagenet, transformer_xl_enwik8, transformer_xl_wikitext103  # noqa: E402

SPARSITIES = ((0.8, 0.5), (0.9, 0.8), (0.95, 0.9))
VOCABULARY = {'enwik8': 256, 'wikitext103': 267_735}  # bytes; words of WikiText-103's train
OPTIMIZERS = {
  'adam': lambda: optax.adam(1e-3),
  'sgd_momentum': lambda: optax.sgd(0.1, momentum=0.9),
}


def paper_models(chosen=('resnet50', 'txl_enwik8', 'txl_wikitext103')):
  """name -> (params as ShapeDtypeStructs, sparsity overrides) of the ``chosen`` models, each
  built from its config."""
  key = jax.random.key(0)
  found = {}
  if 'resnet50' in chosen:
    resnet = models.ResNet50(num_classes=1000, **model_fields(resnet50_imagenet.get_config()))
    params = jax.eval_shape(resnet.init, key, jnp.zeros((1, 224, 224, 3)))['params']
    found['resnet50'] = (params, models.resnet_sparsity())
  for name, module in (('txl_enwik8', transformer_xl_enwik8), ('txl_wikitext103', transformer_xl_wikitext103)):  # fmt: skip
    if name not in chosen:
      continue
    config = module.get_config()
    model = models.TransformerXL(vocab_size=VOCABULARY[config.dataset], **model_fields(config))
    params = jax.eval_shape(model.init, key, jnp.zeros((1, 8), jnp.int32))['params']
    found[name] = (params, models.transformer_xl_sparsity())
  return found


def model_fields(config) -> dict:
  return {k: v for k, v in config.model.items() if k != 'name'}


def nbytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_rows(params, overrides):
  """One row per (optimizer, sparsity): bytes of each state and ratios to the plain one."""
  rows = []
  for opt_name, optimizer in OPTIMIZERS.items():
    plain = nbytes(jax.eval_shape(optimizer().init, params))
    for forward, backward in SPARSITIES:
      kwargs = dict(forward_sparsity=forward, backward_sparsity=backward, sparsity=overrides)
      dense_state = jax.eval_shape(topkast_jax.topkast(optimizer(), **kwargs).init, params)
      compact = jax.eval_shape(
        topkast_jax.topkast(optimizer(), compact_inner_state=True, **kwargs).init, params
      )
      masks = (dense_state.forward_mask, dense_state.backward_mask)
      packed = nbytes(masks)
      as_bool = 2 * sum(bitmask.size(m) for m in jax.tree.leaves(dense_state.forward_mask))
      row = {
        'optimizer': opt_name,
        'forward': forward,
        'backward': backward,
        'plain_bytes': plain,
        'bool_masks_bytes': nbytes(dense_state) - packed + as_bool,
        'dense_state_bytes': nbytes(dense_state),
        'compact_bytes': nbytes(compact),
      }
      for name in ('bool_masks', 'dense_state', 'compact'):
        row[f'{name}_ratio'] = row[f'{name}_bytes'] / plain
      rows.append(row)
  return rows


def time_rows(names, rounds, seconds):
  """Step time of plain, Top-KAST dense-state and compact at 0.9 / 0.8, per model."""
  rng = np.random.default_rng(0)
  rows = []
  for name in names:
    loss_fn, params, batch, optimizer, kwargs = setup(name, rng)
    kwargs = {**kwargs, 'forward_sparsity': 0.9, 'backward_sparsity': 0.8}
    steps = {}
    plain = optimizer()

    def plain_step(p, s, batch, tx=plain, loss_fn=loss_fn):
      updates, s = tx.update(jax.grad(loss_fn)(p, batch), s, p)
      return optax.apply_updates(p, updates), s

    steps['plain'] = (jax.jit(plain_step), plain.init(params))
    for label, compact in (('dense_state', False), ('compact', True)):
      tx = topkast_jax.topkast(optimizer(), compact_inner_state=compact, **kwargs)

      def sparse_step(p, s, batch, tx=tx, loss_fn=loss_fn):
        grads = jax.grad(loss_fn)(topkast_jax.sparse_params(p, s), batch)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

      steps[label] = (jax.jit(sparse_step), tx.init(params))
    carry = {k: (params, s) for k, (_, s) in steps.items()}
    for k, (step, _) in steps.items():  # compile and warm up
      _, *carry[k] = time_steps(step, *carry[k], batch, 2)
    one, *carry['dense_state'] = time_steps(
      steps['dense_state'][0], *carry['dense_state'], batch, 3
    )
    n = max(3, round(seconds / one))
    times = {k: [] for k in steps}
    for _ in range(rounds):
      for k, (step, _) in steps.items():
        elapsed, *carry[k] = time_steps(step, *carry[k], batch, n)
        times[k].append(elapsed)
    medians = {k: statistics.median(v) for k, v in times.items()}
    row = {'model': name, 'rounds': rounds, 'steps_per_round': n}
    for k, t in medians.items():
      row[f'{k}_ms'] = t * 1e3
      row[f'{k}_vs_dense_state'] = t / medians['dense_state']
    rows.append(row)
  return rows


def sparse_weights(params, overrides) -> tuple[int, int]:
  tx = topkast_jax.topkast(
    optax.sgd(0.1), forward_sparsity=0.9, backward_sparsity=0.8, sparsity=overrides
  )
  masks = jax.eval_shape(tx.init, params).forward_mask
  total = sum(x.size for x in jax.tree.leaves(params))
  sparse = sum(
    bitmask.size(m) for m in jax.tree.leaves(masks, is_leaf=is_masked) if not is_masked(m)
  )
  return total, sparse


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--time_models', default='mlp,transformer_xl', help="'' to skip timing")
  parser.add_argument('--memory_models', default='resnet50,txl_enwik8,txl_wikitext103')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--seconds', type=float, default=1.5, help='per round and configuration')
  parser.add_argument('--out_dir', default='.')
  args = parser.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)')
  results = {'memory': {}, 'time': []}
  print('| model | optimizer | sparsity | plain | bool masks | dense state | compact |')
  print('|---|---|---|---|---|---|---|')
  for name, (params, overrides) in paper_models(args.memory_models.split(',')).items():
    total, sparse = sparse_weights(params, overrides)
    rows = memory_rows(params, overrides)
    results['memory'][name] = {'parameters': total, 'sparse_weights': sparse, 'rows': rows}
    for r in rows:
      print(
        f'| {name} ({total / 1e6:.1f}M, {sparse / total:.0%} sparse) | {r["optimizer"]} | '
        f'{r["forward"]} / {r["backward"]} | {r["plain_bytes"] / 2**20:,.0f} MiB | '
        f'{r["bool_masks_ratio"]:.2f}x | {r["dense_state_ratio"]:.2f}x | {r["compact_ratio"]:.2f}x |'
      )
  models_to_time = [m for m in args.time_models.split(',') if m]
  for row in time_rows(models_to_time, args.rounds, args.seconds):
    results['time'].append(row)
    print(
      f'{row["model"]} 0.9 / 0.8, {row["rounds"]} rounds x {row["steps_per_round"]} steps: '
      f'plain {row["plain_ms"]:.2f} ms, dense state {row["dense_state_ms"]:.2f} ms, '
      f'compact {row["compact_ms"]:.2f} ms; compact_vs_dense_state='
      f'{row["compact_vs_dense_state"]:.3f}'
    )
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, 'state_memory.json')
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
