"""The train loop both tasks run: steps, progress, periodic evaluation and checkpoints."""

import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from topkast_jax.training import common
from topkast_jax.training.checkpoint import Checkpointer
from topkast_jax.training.logger import MetricLogger
from topkast_jax.training.state import TrainState, new_rng, unreplicate


def initial_state(config, workdir: str, tx, variables) -> tuple[TrainState, Checkpointer]:
  """A fresh train state (host arrays) or, if ``workdir`` has one, the latest checkpoint's."""
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(variables['params']),
    rng=new_rng(config.seed),
  )
  state = jax.device_get(state)
  checkpointer = Checkpointer(
    os.path.join(workdir, 'checkpoints'), config.get('max_checkpoints', 3)
  )
  restored = checkpointer.restore_latest({'state': state})
  return (state if restored is None else restored['state']), checkpointer


def train(
  config,
  workdir: str,
  *,
  state,
  start: int,
  total_steps: int,
  train_step: Callable,
  evaluate: Callable[[object], dict],
  describe: Callable[[dict], str],
  eval_name: str,
  checkpointer: Checkpointer,
):
  """Runs steps ``[start, total_steps)``; returns the replicated state, history and seconds.

  ``train_step(state, step) -> (state, metrics)`` runs one pmapped step; ``evaluate(state)``
  gives the periodic evaluation's metrics, which ``describe`` turns into the console line's text
  after ``[method] {eval_name} at step N:``.
  """
  sparse = config.method == 'topkast'
  logger = MetricLogger(workdir, total_steps, start, name=f'[{config.method}] ')
  history, started = [], time.perf_counter()
  eval_every = config.get('eval_every_steps', 0)
  checkpoint_every = config.get('checkpoint_every_steps', 0)
  # Cross-process CPU collectives can hang when steps are dispatched without waiting.
  sync = config.get('sync_every_step', False) or (
    jax.process_count() > 1 and jax.default_backend() == 'cpu'
  )
  try:
    for step in range(start, total_steps):
      state, metrics = train_step(state, step)
      if sync:
        jax.block_until_ready(state)
      done = step + 1
      if common.due(done, config.log_every_steps, total_steps):
        common.log_train(logger, done, metrics, state, sparse)
      if common.due(done, eval_every, total_steps):
        result = evaluate(state)
        logger.write(done, result, 'eval')
        history.append({'step': done, **result})
        if logger.active:
          print(f'[{config.method}] {eval_name} at step {done}: {describe(result)}', flush=True)
      if common.due(done, checkpoint_every, total_steps):
        checkpointer.save(done, {'state': unreplicate(state)})
  finally:
    logger.close()
    checkpointer.close()
  return state, history, time.perf_counter() - started
