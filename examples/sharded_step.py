"""Top-KAST in your own jit'd step on sharded parameters: FSDP over 8 (fake CPU) devices.

A 784-512-256-10 MLP on Fashion-MNIST (the Debian package ``dataset-fashion-mnist``). Each kernel is
sharded over its rows (``P('data', None)``) and each batch over its examples, on an explicit
mesh (``jax.make_mesh``); the optimizer state gets its shardings from ``jax.eval_shape`` of
``tx.init`` on the sharded params. Top-KAST (0.9 / 0.8, ``compact_inner_state=True``: Adam's
moments for B's weights only, sharded too) refreshes its masks every step; the refresh
exchanges histograms and counts between devices, never a kernel. Prints the loss, the test
accuracy of the sparse model and the bytes of the optimizer state per device.

The loop waits for each step: with fake CPU devices, XLA:CPU deadlocked (a 40 s rendezvous
timeout in an all-gather, 3 runs of 4) when the host queued several steps that hold
collectives; on GPUs and TPUs, leave the queue to JAX.

  python examples/sharded_step.py [--steps 600]
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import topkast_jax  # noqa: E402
from topkast_jax.data.idx import fashion_mnist_arrays  # noqa: E402

SIZES = (784, 512, 256, 10)  # rows divisible by 8 devices (explicit sharding needs it)


def init_params(key):
  keys = jax.random.split(key, len(SIZES) - 1)
  return {
    f'dense_{i}': {
      'kernel': jax.random.normal(k, (d_in, d_out)) * np.sqrt(2.0 / d_in),
      'bias': jnp.zeros(d_out),
    }
    for i, (k, d_in, d_out) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))
  }


def logits_of(params, x):
  for i in range(len(SIZES) - 1):
    layer = params[f'dense_{i}']
    x = x @ layer['kernel'] + layer['bias']
    x = jax.nn.relu(x) if i < len(SIZES) - 2 else x
  return x


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits_of(params, x), y).mean()


def fsdp_spec(leaf):
  """Kernels sharded over their rows, biases replicated."""
  return P('data', None) if leaf.ndim == 2 else P()


def load(split):
  x, y = fashion_mnist_arrays(split)
  return (x.reshape(len(x), -1).astype(np.float32) / 255.0 - 0.2860) / 0.3530, y.astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--batch_size', type=int, default=128)
  args = parser.parse_args()
  mesh = jax.make_mesh((jax.device_count(),), ('data',))  # explicit axes: JAX's default
  tx = topkast_jax.topkast(
    optax.adam(1e-3), forward_sparsity=0.9, backward_sparsity=0.8, compact_inner_state=True
  )

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = topkast_jax.sparse_value_and_grad(loss_fn)(params, opt_state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def correct(params, opt_state, x, y):
    predictions = jnp.argmax(logits_of(topkast_jax.sparse_params(params, opt_state), x), -1)
    return jnp.sum(predictions == y)

  (train_x, train_y), (test_x, test_y) = load('train'), load('test')
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    params = jax.tree.map(lambda p: jax.device_put(p, fsdp_spec(p)), init_params(jax.random.key(0)))
    state_shardings = jax.tree.map(lambda s: s.sharding, jax.eval_shape(tx.init, params))
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
      rows = rng.integers(0, len(train_x), args.batch_size)
      x, y = (jax.device_put(a[rows], P('data')) for a in (train_x, train_y))
      params, opt_state, loss = train_step(params, opt_state, x, y)
      loss.block_until_ready()  # one step in flight on fake CPU devices (module docstring)
      if step % 100 == 0 or step == args.steps:
        rate = step / (time.perf_counter() - start)
        print(f'step {step}/{args.steps}  loss {float(loss):.4f}  {rate:.1f} steps/s', flush=True)
    hits = 0
    for i in range(0, len(test_x), 1000):  # 10,000 test images, batches of 1000
      x, y = (jax.device_put(a[i : i + 1000], P('data')) for a in (test_x, test_y))
      hits += int(correct(params, opt_state, x, y))
  kernel = params['dense_0']['kernel']
  state_bytes = sum(
    max(s.data.nbytes for s in leaf.addressable_shards) for leaf in jax.tree.leaves(opt_state)
  )
  metrics = topkast_jax.sparsity_metrics(opt_state, per_leaf=False)
  print(f'devices: {jax.device_count()}; dense_0 kernel {kernel.shape} as {kernel.sharding.spec}')
  print(f'forward density {float(metrics["forward_density"]):.4f}')
  print(f'optimizer state per device: {state_bytes / 1e6:.3f} MB')
  print(f'test accuracy (sparse model): {hits / len(test_x):.4f}')


if __name__ == '__main__':
  main()
