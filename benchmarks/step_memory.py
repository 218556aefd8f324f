"""Peak memory of the compiled, donated training step: Top-KAST and the baselines against dense.

What decides whether a model fits a device is the step's peak, not the state's bytes: XLA's
memory analysis of ``jax.jit(step, donate_argnums=(0, 1)).lower(...).compile()`` gives the
arguments (params, optimizer state, batch), the temporaries and the outputs; with params and
state donated, peak = arguments + temporaries + outputs - aliased. Nothing is allocated or run
(the step is lowered from shapes), so the paper's models compile on a laptop's CPU.

Models, with their config's architecture, Adam, at forward / backward sparsity 0.9 / 0.8
(the baselines at 0.9):

* ``resnet50``: ResNet-50 of ``configs/resnet50_imagenet.py`` (first conv and head dense),
  batch ``--resnet_batch`` of 224 x 224 images, BatchNorm in training mode;
* ``txl_enwik8``: the 24-layer Transformer-XL of ``configs/transformer_xl_enwik8.py`` (attention
  and feed-forward kernels sparse), ``--txl_batch`` rows of ``--txl_len`` bytes, memory as long
  (``--txl_layers``: fewer layers, compiled in seconds);
* ``mlp``: the 784-512-512-10 MLP of ``step_overhead.py`` (batch 256): seconds to compile.

Sparse steps differentiate through ``topkast_jax.sparse_value_and_grad`` (the library's path,
which recomputes the sparse params for the backward pass instead of keeping a copy). Prints one
table per model (MiB, and the peak's ratio to dense) and writes
``step_memory.json`` to ``--out_dir``.

  python benchmarks/step_memory.py [--models resnet50,txl_enwik8] [--methods topkast,...]
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax
from step_overhead import MLP

import topkast_jax
from topkast_jax import models
from topkast_jax.atomic import atomic_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import resnet50_imagenet, transformer_xl_enwik8  # noqa: E402

MIB = 2**20
FORWARD, BACKWARD = 0.9, 0.8
# name -> (build(sparsity overrides), compact): each a method of the one engine, Adam inside.
METHODS = {
  'topkast': lambda s: topkast_jax.topkast(
    optax.adam(1e-3), forward_sparsity=FORWARD, backward_sparsity=BACKWARD, sparsity=s,
    exploration_l2=1e-4,
  ),
  'topkast_compact': lambda s: topkast_jax.topkast(
    optax.adam(1e-3), forward_sparsity=FORWARD, backward_sparsity=BACKWARD, sparsity=s,
    exploration_l2=1e-4, compact_inner_state=True,
  ),
  'static': lambda s: topkast_jax.static_sparse(optax.adam(1e-3), sparsity_level=FORWARD, sparsity=s),
  'set': lambda s: topkast_jax.set_sparse(
    optax.adam(1e-3), sparsity_level=FORWARD, end_step=1000, sparsity=s
  ),
  'rigl': lambda s: topkast_jax.rigl(
    optax.adam(1e-3), sparsity_level=FORWARD, end_step=1000, sparsity=s
  ),
  'rigl_compact': lambda s: topkast_jax.rigl(
    optax.adam(1e-3), sparsity_level=FORWARD, end_step=1000, sparsity=s, compact_inner_state=True
  ),
  'magnitude_pruning': lambda s: topkast_jax.magnitude_pruning(
    optax.adam(1e-3), sparsity_level=FORWARD, end_step=1000, sparsity=s
  ),
  'ste': lambda s: topkast_jax.ste(optax.adam(1e-3), sparsity_level=FORWARD, sparsity=s),
}  # fmt: skip


def model_fields(config) -> dict:
  return {k: v for k, v in config.model.items() if k != 'name'}


def resnet50(batch):
  """(loss_fn(params, extra, batch), params, extra, batch, sparsity), all as shapes."""
  model = models.ResNet50(num_classes=1000, **model_fields(resnet50_imagenet.get_config()))
  images = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)

  def loss_fn(params, extra, data):
    logits, new_extra = model.apply(
      {'params': params, **extra}, data[0], train=True, mutable=list(extra)
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, data[1]).mean()
    return loss, new_extra

  extra = {k: v for k, v in variables.items() if k != 'params'}
  return loss_fn, variables['params'], extra, (images, labels), models.resnet_sparsity()


def txl_enwik8(batch, length, layers=0):
  config = transformer_xl_enwik8.get_config()
  fields = {**model_fields(config), 'mem_len': length, 'dropout': 0.0, 'dropatt': 0.0}
  fields['n_layer'] = layers or fields['n_layer']
  model = models.TransformerXL(vocab_size=256, **fields)
  tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)
  mems = tuple(
    jax.ShapeDtypeStruct((batch, length, model.d_model), jnp.float32) for _ in range(model.n_layer)
  )
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']

  def loss_fn(params, extra, data):
    tokens, mems = data
    log_probs, new_mems = model.apply({'params': params}, tokens[:, :-1], mems)
    loss = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()
    return loss, extra

  return loss_fn, params, {}, (tokens, mems), models.transformer_xl_sparsity()


def mlp():
  model = MLP()
  images = jax.ShapeDtypeStruct((256, 28, 28, 1), jnp.float32)
  labels = jax.ShapeDtypeStruct((256,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)['params']

  def loss_fn(params, extra, data):
    logits = model.apply({'params': params}, data[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, data[1]).mean(), extra

  return loss_fn, params, {}, (images, labels), None


def peak(loss_fn, params, extra, batch, tx, sparse) -> dict:
  """Memory analysis of one donated step of ``tx`` (``sparse``: at the sparse point), MiB."""

  def step(p, s, extra, data):
    if sparse:  # the library's path: the sparse params recomputed for the backward pass
      (_, extra), grads = topkast_jax.sparse_value_and_grad(loss_fn, has_aux=True)(
        p, s, extra, data
      )
    else:
      grads, extra = jax.grad(loss_fn, has_aux=True)(p, extra, data)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, extra

  return memory_of(step, tx, params, extra, batch)


def memory_of(step, tx, params, extra, batch) -> dict:
  """Memory analysis of ``step(params, state, extra, batch)`` jitted with the first three
  donated, ``state`` the shape of ``tx.init(params)``, MiB."""
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, state, extra, batch).compile()
  m = compiled.memory_analysis()
  args, temp = m.argument_size_in_bytes, m.temp_size_in_bytes
  out, alias = m.output_size_in_bytes, m.alias_size_in_bytes
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, state)))
  return {
    'params_and_state_mib': state_bytes / MIB,
    'arguments_mib': args / MIB,
    'temporaries_mib': temp / MIB,
    'outputs_mib': out / MIB,
    'aliased_mib': alias / MIB,
    'peak_mib': (args + temp + out - alias) / MIB,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='resnet50,txl_enwik8')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--resnet_batch', type=int, default=8)
  parser.add_argument('--txl_batch', type=int, default=2)
  parser.add_argument('--txl_len', type=int, default=256)
  parser.add_argument('--txl_layers', type=int, default=0, help="0: the config's 24")
  parser.add_argument('--out_dir', default='.')
  args = parser.parse_args()
  builders = {
    'resnet50': lambda: resnet50(args.resnet_batch),
    'txl_enwik8': lambda: txl_enwik8(args.txl_batch, args.txl_len, args.txl_layers),
    'mlp': mlp,
  }
  chosen, methods = args.models.split(','), args.methods.split(',')
  for names, known, what in ((chosen, builders, 'models'), (methods, METHODS, 'methods')):
    unknown = sorted(set(names) - set(known))
    if unknown:
      parser.error(f'unknown {what} {unknown}; choose from {", ".join(known)}')
  print(
    f'jax {jax.__version__} on {jax.devices()[0].platform}; Adam; sparse at {FORWARD} / {BACKWARD}'
  )
  results = {}
  for name in chosen:
    loss_fn, params, extra, batch, sparsity = builders[name]()
    start = time.perf_counter()
    rows = {'dense': peak(loss_fn, params, extra, batch, optax.adam(1e-3), sparse=False)}
    for method in methods:
      rows[method] = peak(loss_fn, params, extra, batch, METHODS[method](sparsity), sparse=True)
    dense = rows['dense']['peak_mib']
    print(f'{name} ({time.perf_counter() - start:.0f} s to compile {len(rows)} steps)')
    print('| step | params + state | temporaries | peak | peak vs dense |')
    print('|---|---|---|---|---|')
    for method, row in rows.items():
      row['peak_ratio_vs_dense'] = row['peak_mib'] / dense
      print(
        f'| {method} | {row["params_and_state_mib"]:.1f} MiB | {row["temporaries_mib"]:.1f} MiB | '
        f'{row["peak_mib"]:.1f} MiB | {row["peak_ratio_vs_dense"]:.3f}x |'
      )
    results[name] = rows
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, 'step_memory.json')
  with atomic_file(path) as f:
    json.dump(results, f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
