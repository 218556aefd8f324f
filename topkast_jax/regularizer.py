"""Gradient restriction to B and the exploration penalty (Jayakumar et al. 2020, sec. 2.2).

R(theta) = lambda * (sum over A of theta^2 / 2 + 1/D * sum over B \\ A of theta^2 / 2), zero on C,
where D is the leaf's forward density. Scaling B \\ A by 1/D (not 1/S) pushes the weights just
outside A down harder, so A keeps exploring.
"""

import jax
import jax.numpy as jnp
import optax

from topkast_jax.sparsity import LeafSparsity


def penalty_scale(forward_mask, backward_mask, spec: LeafSparsity) -> jax.Array:
  """1 on A, 1/D on B \\ A, 0 on C (float32)."""
  return jnp.where(
    forward_mask, 1.0, jnp.where(backward_mask, 1.0 / spec.forward_density, 0.0)
  ).astype(jnp.float32)


def restrict_and_regularise(grads, params, forward_mask, backward_mask, specs, exploration_l2):
  """Gradient on B plus the penalty's gradient, and the per-leaf penalty value.

  Args:
    grads: gradient with respect to the sparse parameters alpha.
    params: the dense parameters theta.
    forward_mask, backward_mask: A and B, with ``optax.MaskedNode()`` at dense leaves.
    specs: `LeafSparsity` or None per leaf, aligned with ``tree_leaves(params)``.
    exploration_l2: lambda (a Python number or a scalar array).

  Returns:
    ``(grads, penalty)``: dense leaves' gradients pass unchanged; ``penalty`` holds a float32
    scalar per sparse leaf and ``optax.MaskedNode()`` at dense ones.
  """
  grad_leaves, treedef = jax.tree_util.tree_flatten(grads)
  param_leaves = treedef.flatten_up_to(params)
  a_leaves = treedef.flatten_up_to(forward_mask)
  b_leaves = treedef.flatten_up_to(backward_mask)
  no_penalty = isinstance(exploration_l2, (int, float)) and exploration_l2 == 0
  new_grads, penalties = [], []
  for g, p, a, b, spec in zip(grad_leaves, param_leaves, a_leaves, b_leaves, specs):
    if spec is None:
      new_grads.append(g)
      penalties.append(optax.MaskedNode())
      continue
    restricted = jnp.where(b, g, jnp.zeros_like(g))
    if no_penalty:
      new_grads.append(restricted)
      penalties.append(jnp.zeros((), jnp.float32))
      continue
    on_b = jnp.where(b, p, jnp.zeros_like(p)).astype(jnp.float32)  # no 0 * inf from C
    weighted = exploration_l2 * penalty_scale(a, b, spec) * on_b
    new_grads.append(restricted + weighted.astype(g.dtype))
    penalties.append(0.5 * jnp.sum(weighted * on_b))
  return (
    jax.tree_util.tree_unflatten(treedef, new_grads),
    jax.tree_util.tree_unflatten(treedef, penalties),
  )
