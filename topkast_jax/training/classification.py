"""Image classification train and eval steps: pure functions for ``jax.pmap(axis_name='batch')``."""

import jax
import jax.numpy as jnp
import optax

from topkast_jax.training.state import TrainState, forward_params

AXIS = 'batch'


def train_step(
  state: TrainState,
  batch,
  *,
  model,
  tx,
  schedule,
  num_classes: int,
  label_smoothing: float,
  sparse: bool,
):
  """One step: gradient w.r.t. the forward parameters, averaged over devices, then tx."""

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
    )
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], num_classes), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    forward_params(state, sparse)
  )
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    batch_stats=batch_stats,
    opt_state=opt_state,
  )
  metrics = {
    'loss': loss,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
    'learning_rate': schedule(state.step),
  }
  return new_state, jax.lax.pmean(metrics, AXIS)


def eval_step(state: TrainState, batch, *, model, sparse: bool):
  """Summed loss, correct predictions and example count over the real (mask 1) examples."""
  logits = model.apply(
    {'params': forward_params(state, sparse), 'batch_stats': state.batch_stats},
    batch['image'],
    train=False,
  )
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  mask = batch['mask']
  sums = {
    'loss': jnp.sum(losses * mask),
    'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
    'count': jnp.sum(mask),
  }
  return jax.lax.psum(sums, AXIS)
