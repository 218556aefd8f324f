"""``train_and_evaluate`` for language modelling (Transformer-XL on enwik8, WikiText-103, sotu).

Memories live on the devices as ``[devices, rows, mlen, d_model]`` per layer and are carried
from step to step (training and evaluation separately). A checkpoint holds parameters,
optimizer state, step (the data position) and RNG; after a restart the memories start empty,
as at the start of training, so a resumed LM run is not bit-identical to an unbroken one.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from topkast_jax.data import sources
from topkast_jax.data.language_model import LanguageModelBatches
from topkast_jax.data.text_builders import read_stream
from topkast_jax.training import common, language_modeling, loop, schedules
from topkast_jax.training.optimizer import make_optimizer
from topkast_jax.training.state import replicate, unreplicate


def empty_mems(model, rows_per_device: int, num_devices: int):
  return tuple(
    np.zeros((num_devices, rows_per_device, 0, model.d_model), np.float32)
    for _ in range(model.n_layer)
  )


def evaluate(p_eval, state, model, config, split: str, devices) -> dict:
  """Negative log-likelihood over every target token of ``split`` exactly once."""
  tokens = read_stream(common.open_split(config, split))
  batches = LanguageModelBatches(
    tokens,
    batch_size=config.eval_batch_size,
    tgt_len=config.eval_tgt_len,
    num_devices=len(devices),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    exact=True,
  )
  mems = empty_mems(
    model, config.eval_batch_size // jax.process_count() // len(devices), len(devices)
  )
  nll = count = 0.0
  for batch in batches:
    mems, sums = p_eval(state, mems, batch)
    sums = jax.device_get(sums)
    nll, count = nll + float(sums['nll'][0]), count + float(sums['count'][0])
  per_token = nll / count
  return {
    'nll': per_token,
    'bits_per_token': per_token / math.log(2),
    'perplexity': math.exp(min(per_token, 50.0)),
    'tokens': count,
  }


def train_and_evaluate(config, workdir: str) -> dict:
  devices = common.local_devices(config)
  train_tokens = read_stream(common.open_split(config, 'train'))  # prepares sotu if missing
  vocab_size = sources.metadata(config.dataset, config.get('data_dir') or None)['vocabulary_size']
  train_data = LanguageModelBatches(
    train_tokens,
    batch_size=config.batch_size,
    tgt_len=config.tgt_len,
    num_devices=len(devices),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  total_steps = config.num_train_steps

  model, overrides = common.build_model(config, vocab_size)
  eval_model = model.clone(mem_len=config.eval_mem_len)
  variables = model.init(jax.random.key(config.seed), jnp.zeros((1, config.tgt_len), jnp.int32))
  schedule = schedules.from_config(config, len(train_data), total_steps)
  tx = make_optimizer(config, schedule, variables['params'], overrides)
  sparse = config.method == 'topkast'
  state, checkpointer = loop.initial_state(config, workdir, tx, variables)
  start = int(state.step)

  axis = language_modeling.AXIS
  p_train = jax.pmap(
    functools.partial(
      language_modeling.train_step, model=model, tx=tx, schedule=schedule, sparse=sparse
    ),
    axis_name=axis,
    devices=common.pmap_devices(devices),
    donate_argnums=(0,),
  )
  p_eval = jax.pmap(
    functools.partial(language_modeling.eval_step, model=eval_model, sparse=sparse),
    axis_name=axis,
    devices=common.pmap_devices(devices),
  )
  rows = config.batch_size // jax.process_count() // len(devices)
  mems = empty_mems(model, rows, len(devices))

  def train_step(state, step):
    nonlocal mems  # each device's memory follows its rows from step to step
    state, mems, metrics = p_train(state, mems, train_data[step])
    return state, metrics

  state, history, seconds = loop.train(
    config,
    workdir,
    state=replicate(state, len(devices)),
    start=start,
    total_steps=total_steps,
    train_step=train_step,
    evaluate=lambda state: evaluate(p_eval, state, eval_model, config, 'validation', devices),
    describe=lambda r: f'{r["bits_per_token"]:.4f} bits/token, perplexity {r["perplexity"]:.2f}',
    eval_name='validation',
    checkpointer=checkpointer,
  )
  results = common.summary(
    config,
    'language_modeling',
    total_steps,
    start,
    seconds,
    history,
    unreplicate(state),
    sparse,
    final_validation=history[-1] if history else None,
    test=evaluate(p_eval, state, eval_model, config, 'test', devices),
  )
  common.write_results(workdir, results)
  return results
