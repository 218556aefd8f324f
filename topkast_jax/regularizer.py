"""Gradient restriction to B and the exploration penalty (Jayakumar et al. 2020, sec. 2.2).

R(theta) = lambda * (sum over A of theta^2 / 2 + 1/D * sum over B \\ A of theta^2 / 2), zero on C,
where D is the leaf's forward density. Scaling B \\ A by 1/D (not 1/S) pushes the weights just
outside A down harder, so A keeps exploring.
"""

import jax
import jax.numpy as jnp
import optax

from topkast_jax.sparsity import is_dense


def restrict_and_regularise(grads, params, forward_mask, backward_mask, specs, exploration_l2):
  """Gradient on B plus the penalty's gradient, and the per-leaf penalty value.

  Args:
    grads: gradient with respect to the sparse parameters alpha.
    params: the dense parameters theta.
    forward_mask, backward_mask: A and B (bool), with ``optax.MaskedNode()`` at dense leaves.
    specs: a `LeafSparsity` per sparse leaf, ``optax.MaskedNode()`` at dense ones.
    exploration_l2: lambda (a Python number or a scalar array).

  Returns:
    ``(grads, penalty)``: dense leaves' gradients pass unchanged; ``penalty`` holds a float32
    scalar per sparse leaf and ``optax.MaskedNode()`` at dense ones.
  """
  no_penalty = isinstance(exploration_l2, (int, float)) and exploration_l2 == 0

  def leaf(g, p, a, b, spec):
    if is_dense(spec):
      return g, optax.MaskedNode()
    if no_penalty:
      return jnp.where(b, g, jnp.zeros_like(g)), jnp.zeros((), jnp.float32)
    # One select chain per leaf (A, then B \\ A, then C) so XLA fuses it into a single pass.
    lam_a = jnp.asarray(exploration_l2, jnp.float32)
    lam_b = lam_a / spec.forward_density
    p32 = p.astype(jnp.float32)
    weighted = jnp.where(a, lam_a * p32, jnp.where(b, lam_b * p32, 0.0))
    restricted = jnp.where(b, g + weighted.astype(g.dtype), jnp.zeros_like(g))
    return restricted, 0.5 * jnp.sum(weighted * jnp.where(b, p32, 0.0))

  pairs = jax.tree.map(leaf, grads, params, forward_mask, backward_mask, specs)
  return jax.tree.map(lambda _, r: r[0], grads, pairs), jax.tree.map(
    lambda _, r: r[1], grads, pairs
  )
