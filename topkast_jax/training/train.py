"""``train_and_evaluate(config, workdir)``: one train loop for every task and method. The task
holds what differs (data, model, steps, evaluation, the carry); `methods.build` the optimizer."""

import functools
import os
import time

import grain
import jax
import jax.numpy as jnp

from topkast_jax.training import methods, results, schedules, validation
from topkast_jax.training import state as state_lib
from topkast_jax.training.checkpoint import Checkpointer, run_identity
from topkast_jax.training.classification import Classification
from topkast_jax.training.language_modeling import LanguageModeling
from topkast_jax.training.lock import workdir_lock
from topkast_jax.training.logger import MetricLogger

TASKS = {'image_classification': Classification, 'language_modeling': LanguageModeling}
# Batches load on background threads while the devices run the step.
PREFETCH = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


def due(done: int, every: int, total: int) -> bool:
  """Whether a periodic action (every ``every`` steps, 0 = never, and at the end) runs now."""
  return bool(every and done % every == 0) or done == total


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and evaluates.

  Everything that can be checked (fields, batch sizes against devices, the workdir, the
  checkpoints' run) is checked before the first step.
  """
  validation.check_config(config)
  methods.check(config)
  devices = state_lib.local_devices(config)
  validation.check_layout(config, len(devices), jax.process_count())
  if jax.process_index() != 0:
    return _train_and_evaluate(config, workdir, devices)
  validation.check_workdir(workdir)
  with workdir_lock(workdir):  # one run per workdir at a time
    return _train_and_evaluate(config, workdir, devices)


def _train_and_evaluate(config, workdir: str, devices) -> dict:
  task = TASKS[config.task](config, devices)
  variables = jax.jit(task.init_variables)(jax.random.key(config.seed))
  schedule = schedules.from_config(config, task.steps_per_epoch, task.total_steps)
  method = methods.build(
    config, schedule, variables['params'], task.total_steps, task.sparsity_overrides
  )
  state = jax.device_get(
    state_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      opt_state=jax.jit(method.tx.init)(variables['params']),
      rng=state_lib.new_rng(config.seed),
    )
  )
  checkpointer = Checkpointer(
    os.path.join(workdir, 'checkpoints'),
    config.max_checkpoints,
    run_identity(config),
    total_steps=task.total_steps,
  )
  try:
    start, carry = 0, task.initial_carry()
    restored = checkpointer.restore(state, task.has_carry)
    finished = results.finished_run(workdir, config, task.total_steps, restored)
    if finished is not None:
      if jax.process_index() == 0:
        where = os.path.join(workdir, 'results.json')
        print(f'[{config.method}] finished already: {where} as it was', flush=True)
      return finished
    if restored is not None:
      start, state, saved_carry = restored
      carry = carry if saved_carry is None else task.carry_from_checkpoint(saved_carry)
    logger = MetricLogger(workdir, task.total_steps, start, name=f'[{config.method}] ')
    if restored is not None:
      logger.say(f'[{config.method}] resumed from step {start} of {checkpointer.directory}')
    try:
      p_eval = state_lib.pmap(functools.partial(task.eval_step, sparse=method.sparse), devices)
      evaluate = lambda state, **kw: task.evaluate(p_eval, state, **kw)  # noqa: E731
      state, history, seconds = train(
        config, task, method, schedule, state_lib.replicate(state, devices), carry, start, evaluate,
        logger, checkpointer,
      )  # fmt: skip
    finally:
      logger.close()
  finally:
    checkpointer.close()
  extra = task.final_results(history, functools.partial(evaluate, state))
  summary = results.summary(
    config, task, start, seconds, history, state_lib.unreplicate(state), method.sparse, **extra
  )
  results.write_json(os.path.join(workdir, 'results.json'), summary)
  return summary


def train(config, task, method, schedule, state, carry, start, evaluate, logger, checkpointer):
  """Runs steps ``[start, task.total_steps)``; returns the replicated state, history, seconds."""
  train_step = functools.partial(
    task.train_step, tx=method.tx, schedule=schedule, sparse=method.sparse
  )
  p_train = state_lib.pmap(train_step, task.devices, donate_argnums=(0,))
  total = task.total_steps
  # Cross-process CPU collectives can hang when steps are dispatched without waiting.
  sync = config.sync_every_step or (jax.process_count() > 1 and jax.default_backend() == 'cpu')
  batches = iter(task.train_data[start:].to_iter_dataset(PREFETCH))
  history, started = [], time.perf_counter()
  for step in range(start, total):
    state, carry, metrics = p_train(state, carry, next(batches))
    if sync:
      jax.block_until_ready(state)
    done = step + 1
    if due(done, config.log_every_steps, total):
      metrics = state_lib.unreplicate(metrics)
      logger.write(done, metrics, 'train')
      # The step's metrics are the last training batch's: labelled so, beside evaluations.
      logger.progress(
        done, {(k if k == 'learning_rate' else f'batch_{k}'): v for k, v in metrics.items()}
      )
      if method.sparse:
        logger.write(
          done, results.mask_metrics(state_lib.first_replica(state.opt_state)), 'sparsity'
        )
    if due(done, config.eval_every_steps, total):
      result = evaluate(state)
      logger.write(done, result, 'eval')
      history.append({'step': done, **result})
      logger.say(f'[{config.method}] {task.eval_name} at step {done}: {task.describe(result)}')
    if due(done, config.checkpoint_every_steps, total):
      saved_carry = task.carry_to_checkpoint(carry) if task.has_carry else None
      checkpointer.save(done, state_lib.unreplicate(state), saved_carry)
  return state, history, time.perf_counter() - started
