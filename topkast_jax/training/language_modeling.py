"""Language-model train and eval steps with Transformer-XL memories carried per device."""

import jax
import jax.numpy as jnp
import optax

from topkast_jax.training.state import TrainState, forward_params, step_key

AXIS = 'batch'


def _token_nll(log_probs, targets):
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def train_step(state: TrainState, mems, batch, *, model, tx, schedule, sparse: bool):
  """One segment: loss averaged over real tokens, gradients over devices; returns new mems."""
  dropout_key = step_key(state, AXIS)

  def loss_fn(params):
    log_probs, new_mems = model.apply(
      {'params': params}, batch['inputs'], mems, deterministic=False, rngs={'dropout': dropout_key}
    )
    nll = _token_nll(log_probs, batch['targets'])
    loss = jnp.sum(nll * batch['mask']) / jnp.maximum(jnp.sum(batch['mask']), 1.0)
    return loss, new_mems

  (loss, new_mems), grads = jax.value_and_grad(loss_fn, has_aux=True)(forward_params(state, sparse))
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
    step=state.step + 1, opt_state=opt_state, params=optax.apply_updates(state.params, updates)
  )
  metrics = {
    'loss': loss,
    'bits_per_token': loss / jnp.log(2.0),
    'learning_rate': schedule(state.step),
  }
  return new_state, new_mems, jax.lax.pmean(metrics, AXIS)


def eval_step(state: TrainState, mems, batch, *, model, sparse: bool):
  """Summed negative log-likelihood (nats) and token count; returns the next mems."""
  log_probs, new_mems = model.apply(
    {'params': forward_params(state, sparse)}, batch['inputs'], mems, deterministic=True
  )
  nll = _token_nll(log_probs, batch['targets'])
  sums = {'nll': jnp.sum(nll * batch['mask']), 'count': jnp.sum(batch['mask'])}
  return new_mems, jax.lax.psum(sums, AXIS)
