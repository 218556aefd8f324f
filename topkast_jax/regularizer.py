"""Gradient restriction to B and the exploration penalty (Jayakumar et al. 2020, sec. 2.2).

R(theta) = lambda * (sum over A of theta^2 / 2 + 1/D * sum over B \\ A of theta^2 / 2), zero on C,
where D is the leaf's forward density. Scaling B \\ A by 1/D (not 1/S) pushes the weights just
outside A down harder, so A keeps exploring.
"""

import jax
import jax.numpy as jnp

from topkast_jax import bitmask
from topkast_jax.sparsity import is_dense, path_name
from topkast_jax.states import find_sparse_state, matched_masks


def restrict_and_regularise(grads, params, forward_mask, backward_mask, specs, exploration_l2):
  """The gradient on B plus the penalty's gradient; dense leaves' gradients pass unchanged.

  Args:
    grads: gradient with respect to the sparse parameters alpha.
    params: the dense parameters theta.
    forward_mask, backward_mask: A and B (bool), with ``optax.MaskedNode()`` at dense leaves.
    specs: a `LeafSparsity` per sparse leaf, ``optax.MaskedNode()`` at dense ones.
    exploration_l2: lambda (a Python number or a scalar array).
  """
  no_penalty = isinstance(exploration_l2, (int, float)) and exploration_l2 == 0

  def leaf(g, p, a, b, spec):
    if is_dense(spec):
      return g
    if no_penalty:
      return jnp.where(b, g, jnp.zeros_like(g))
    # One select chain per leaf (A, then B \\ A, then C) so XLA fuses it into a single pass.
    lam_a = jnp.asarray(exploration_l2, jnp.float32)
    p32 = p.astype(jnp.float32)
    weighted = jnp.where(a, lam_a * p32, jnp.where(b, lam_a / spec.forward_density * p32, 0.0))
    return jnp.where(b, g + weighted.astype(g.dtype), jnp.zeros_like(g))

  return jax.tree.map(leaf, grads, params, forward_mask, backward_mask, specs)


def exploration_penalty(params, opt_state, exploration_l2, per_leaf: bool = False):
  """R(params) with the masks in ``opt_state`` (those the next update uses), summed over the
  sparse leaves (float32), or per leaf as ``{path: value}``.

  Not computed inside the step: that reduction over every sparse weight cost 14% of the step of
  `benchmarks/step_overhead.py`'s MLP on CPU; compute it when you log it. D is each leaf's
  ``|A| / n``, the forward density up to the rounding of ``|A|``.
  """
  forward, backward = matched_masks(params, find_sparse_state(opt_state))
  lam = jnp.asarray(exploration_l2, jnp.float32)
  values = {}
  for (path, p), a, b in zip(
    jax.tree_util.tree_leaves_with_path(params),
    jax.tree_util.tree_leaves(forward, is_leaf=is_dense),
    jax.tree_util.tree_leaves(backward, is_leaf=is_dense),
  ):
    if is_dense(a):
      continue
    density = bitmask.count(a).astype(jnp.float32) / bitmask.size(a)
    in_a, in_b = bitmask.unpack(a), bitmask.unpack(b)
    scale = jnp.where(in_a, 1.0, jnp.where(in_b, 1.0 / density, 0.0))
    square = jnp.where(in_b, jnp.square(p.astype(jnp.float32)), 0.0)  # C never counts (inf there)
    values[path_name(path)] = 0.5 * lam * jnp.sum(scale * square)
  return values if per_leaf else sum(values.values(), jnp.zeros((), jnp.float32))
