"""The language modelling task: Transformer-XL on enwik8, WikiText-103 and sotu.

Steps are pure functions for ``jax.pmap(axis_name='batch')``. The carry is the Transformer-XL
memory, per layer ``[devices, rows, mlen, d_model]`` on the devices, passed from step to step
(evaluation keeps its own). Checkpoints hold it as ``[layers, global rows, mlen, d_model]``,
so a restarted run continues bit-identically, with any number of processes and devices.
"""

import math

import grain
import jax
import jax.numpy as jnp
import numpy as np

from topkast_jax import models
from topkast_jax.data import sources
from topkast_jax.data.language_model import LanguageModelBatches
from topkast_jax.data.text_builders import read_stream
from topkast_jax.training import results
from topkast_jax.training import state as state_lib


def _token_nll(log_probs, targets):
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


class LanguageModeling:
  """Data, model, steps and evaluation of a language modelling run."""

  name, eval_name, has_carry = 'language_modeling', 'validation', True

  def __init__(self, config, devices):
    self.config, self.devices = config, devices
    data_dir = config.data_dir or None
    streams = {
      split: read_stream(sources.open_split(config.dataset, split, data_dir, config.prepare_data))
      for split in ('train', 'validation', 'test')
    }
    self._layout = state_lib.data_layout(devices)
    train = LanguageModelBatches(
      streams.pop('train'), batch_size=config.batch_size, tgt_len=config.tgt_len, **self._layout
    )
    self.train_data = grain.MapDataset.source(train).repeat()  # step s: train[s]
    self._eval_streams = streams
    self.steps_per_epoch, self.total_steps = len(train), config.num_train_steps
    self.model = models.TransformerXL(
      vocab_size=sources.metadata(config.dataset, data_dir)['vocabulary_size'],
      **{k: v for k, v in config.model.items() if k != 'name'},
    )
    self.eval_model = self.model.clone(mem_len=config.eval_mem_len)
    self.sparsity_overrides = models.transformer_xl_sparsity()
    all_gather = lambda mems: jax.lax.all_gather(jnp.stack(mems), state_lib.AXIS)  # noqa: E731
    self._gather = state_lib.pmap(all_gather, devices)

  def init_variables(self, key):
    return self.model.init(key, jnp.zeros((1, self.config.tgt_len), jnp.int32))

  def initial_carry(self, batch_size: int | None = None):
    """Empty memories for this process's rows of ``batch_size`` (default: training's)."""
    rows = (batch_size or self.config.batch_size) // jax.process_count() // len(self.devices)
    shape = (len(self.devices), rows, 0, self.model.d_model)
    return tuple(np.zeros(shape, np.float32) for _ in range(self.model.n_layer))

  def carry_to_checkpoint(self, mems) -> np.ndarray:
    """Every process's memories as ``[layers, global rows, mlen, d_model]`` (host)."""
    gathered = np.asarray(jax.device_get(state_lib.first_replica(self._gather(mems))))
    all_devices, layers, rows, mlen, d = gathered.shape
    return gathered.transpose(1, 0, 2, 3, 4).reshape(layers, all_devices * rows, mlen, d)

  def carry_from_checkpoint(self, saved: np.ndarray):
    """This process's rows of saved memories, laid out for its devices."""
    saved = np.asarray(saved)
    if saved.shape[:2] != (self.model.n_layer, self.config.batch_size):
      raise ValueError(f'saved memories have shape {saved.shape}; expected [layers, batch, ...].')
    rows = self.config.batch_size // jax.process_count()
    mine = saved[:, jax.process_index() * rows : (jax.process_index() + 1) * rows]
    mine = mine.reshape(saved.shape[0], len(self.devices), -1, *saved.shape[2:])
    return tuple(mine)

  def train_step(self, state: state_lib.TrainState, mems, batch, *, tx, schedule, sparse: bool):
    """One segment: loss averaged over real tokens, gradients over devices; new mems."""
    dropout_key = state_lib.step_key(state, state_lib.AXIS)

    def loss_fn(params):
      log_probs, new_mems = self.model.apply(
        {'params': params},
        batch['inputs'],
        mems,
        deterministic=False,
        rngs={'dropout': dropout_key},
      )
      nll = _token_nll(log_probs, batch['targets'])
      loss = jnp.sum(nll * batch['mask']) / jnp.maximum(jnp.sum(batch['mask']), 1.0)
      return loss, new_mems

    (loss, new_mems), grads = state_lib.value_and_grad_at_forward(loss_fn, state, sparse)
    new_state = state_lib.apply_gradients(state, grads, tx)
    metrics = {
      'loss': loss,
      'bits_per_token': loss / jnp.log(2.0),
      'learning_rate': schedule(state.step),
    }
    return new_state, new_mems, jax.lax.pmean(metrics, state_lib.AXIS)

  def eval_step(self, state: state_lib.TrainState, mems, batch, *, sparse: bool):
    """Summed negative log-likelihood (nats) and token count; the next mems."""
    log_probs, new_mems = self.eval_model.apply(
      {'params': state_lib.forward_params(state, sparse)}, batch['inputs'], mems, deterministic=True
    )
    nll = _token_nll(log_probs, batch['targets'])
    sums = {'nll': jnp.sum(nll * batch['mask']), 'count': jnp.sum(batch['mask'])}
    return new_mems, jax.lax.psum(sums, state_lib.AXIS)

  def evaluate(self, p_eval, state, split: str = 'validation') -> dict:
    """Negative log-likelihood over every target token of ``split`` exactly once."""
    batches = LanguageModelBatches(
      self._eval_streams[split],
      batch_size=self.config.eval_batch_size,
      tgt_len=self.config.eval_tgt_len,
      exact=True,
      **self._layout,
    )
    mems = self.initial_carry(self.config.eval_batch_size)
    totals = results.evaluation_sums(p_eval, state, mems, batches)
    per_token, count = totals['nll'] / totals['count'], totals['count']
    return {
      'nll': per_token,
      'bits_per_token': per_token / math.log(2),
      'perplexity': math.exp(min(per_token, 50.0)),
      'tokens': count,
    }

  @staticmethod
  def describe(r: dict) -> str:
    return f'{r["bits_per_token"]:.4f} bits/token, perplexity {r["perplexity"]:.2f}'

  def final_results(self, history, evaluate) -> dict:
    return {'final_validation': history[-1] if history else None, 'test': evaluate(split='test')}
