"""Saving the sparse params for the backward pass against recomputing them, at the step's peak.

The forward pass multiplies by alpha = where(A, theta, 0), so each matmul's backward needs its
alpha: either kept from the forward pass (what ``sparse_value_and_grad`` does, a kernel-sized
array per sparse kernel) or recomputed from theta and A's bits. This compiles the donated Adam
step of a chain of ``--layers`` residual feed-forward layers (``--d`` x ``--hidden`` kernels,
batch ``--batch``), lowered from shapes, and prints XLA's memory analysis (peak = arguments +
temporaries + outputs - aliased) of:

* ``dense``: ``jax.grad`` of the loss, plain Adam;
* ``alpha_saved``: Top-KAST 0.9 / 0.8, the library's ``sparse_value_and_grad``;
* ``alpha_recomputed_per_layer``: the same Top-KAST step, the loss's layers each under
  ``jax.checkpoint`` with the masking inside, so that a layer's alpha could be recomputed just
  before its backward (what a model that masks inside its own rematerialised layers would do);
* ``alpha_recomputed_in_backward``: the same, each matmul a ``custom_vjp`` op of (x, theta, A)
  whose backward rebuilds its alpha once the cotangent exists (what a sparse-aware layer would do).

  python benchmarks/alpha_recompute.py [--layers 8 --d 1024 --hidden 4096 --batch 512]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from step_memory import memory_of

import topkast_jax
from topkast_jax import bitmask
from topkast_jax.states import _masked, _zero_outside, find_sparse_state


def layer(x, w_in, w_out, a_in=None, a_out=None, dot=lambda x, w, a: x @ w):
  """A residual feed-forward layer; ``dot(x, w, a)`` is its matmul by a kernel and its mask."""
  return x + dot(jax.nn.gelu(dot(x, w_in, a_in)), w_out, a_out)


def loss(params, x):
  for w_in, w_out in params:
    x = layer(x, w_in, w_out)
  return (x**2).mean()


@jax.custom_vjp
def masked_matmul(x, w, a):
  return x @ _zero_outside(w, a)


def _masked_matmul_fwd(x, w, a):
  return masked_matmul(x, w, a), (x, w, a)


def _masked_matmul_bwd(residuals, g):
  x, w, a = residuals
  alpha = w * bitmask.unpack(a).astype(w.dtype)  # rebuilt here, written unlike the forward's
  return g @ alpha.T, x.T @ g, np.zeros(a.shape, jax.dtypes.float0)


masked_matmul.defvjp(_masked_matmul_fwd, _masked_matmul_bwd)


def masked_loss(masked_layer):
  """``loss(params, opt_state, x)`` through ``masked_layer(x, w_in, w_out, a_in, a_out)``."""

  def loss_of(params, opt_state, x):
    for (w_in, w_out), (a_in, a_out) in zip(params, find_sparse_state(opt_state).forward_mask):
      x = masked_layer(x, w_in, w_out, a_in, a_out)
    return (x**2).mean()

  return loss_of


# Each layer under jax.checkpoint keeps its inputs (x, theta, A's bits) and recomputes the rest.
loss_recomputed_per_layer = masked_loss(
  jax.checkpoint(lambda *args: layer(*args, dot=lambda x, w, a: x @ _masked(w, a)))
)
loss_recomputed_in_backward = masked_loss(lambda *args: layer(*args, dot=masked_matmul))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=8)
  parser.add_argument('--d', type=int, default=1024)
  parser.add_argument('--hidden', type=int, default=4096)
  parser.add_argument('--batch', type=int, default=512)
  args = parser.parse_args(argv)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  params = [(f32(args.d, args.hidden), f32(args.hidden, args.d)) for _ in range(args.layers)]
  x = f32(args.batch, args.d)
  topkast = topkast_jax.topkast(optax.adam(1e-3), forward_sparsity=0.9, backward_sparsity=0.8)
  steps = {  # name -> (optimizer, gradient of (params, opt_state, x))
    'dense': (optax.adam(1e-3), lambda p, s, x: jax.grad(loss)(p, x)),
    'alpha_saved': (topkast, lambda p, s, x: topkast_jax.sparse_value_and_grad(loss)(p, s, x)[1]),
    'alpha_recomputed_per_layer': (topkast, jax.grad(loss_recomputed_per_layer)),
    'alpha_recomputed_in_backward': (topkast, jax.grad(loss_recomputed_in_backward)),
  }
  print(
    f'{args.layers} layers of {args.d} x {args.hidden} and {args.hidden} x {args.d} kernels '
    f'({args.layers * 2 * args.d * args.hidden * 4 / 2**20:.0f} MiB), batch {args.batch}, '
    f'Adam; jax {jax.__version__} on {jax.default_backend()}'
  )
  rows = {}
  for name, (tx, grads_of) in steps.items():

    def step(p, s, extra, x, tx=tx, grads_of=grads_of):
      updates, s = tx.update(grads_of(p, s, x), s, p)
      return optax.apply_updates(p, updates), s, extra

    rows[name] = memory_of(step, tx, params, {}, x)
    temp, peak = rows[name]['temporaries_mib'], rows[name]['peak_mib']
    print(f'  {name:28s} temporaries {temp:8.1f} MiB  peak {peak:8.1f} MiB  '
          f'ratio_vs_dense={peak / rows["dense"]["peak_mib"]:.3f}')  # fmt: skip


if __name__ == '__main__':
  main()
