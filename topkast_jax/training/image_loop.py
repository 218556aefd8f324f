"""``train_and_evaluate`` for image classification (ResNet on Fashion-MNIST, CIFAR, ImageNet)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from topkast_jax.data import images
from topkast_jax.training import classification, common, loop, schedules
from topkast_jax.training.optimizer import make_optimizer
from topkast_jax.training.state import replicate, unreplicate

NUM_CLASSES = {'fashion_mnist': 10, 'cifar10': 10, 'imagenet2012': 1000}


def image_spec(config) -> images.ImageSpec:
  spec = images.SPECS[config.dataset]
  if config.get('image_size', 0):  # smaller inputs for tests and quick runs
    size = config.image_size
    spec = dataclasses.replace(
      spec, image_size=size, eval_resize=None if spec.eval_resize is None else size * 8 // 7
    )
  return spec


def evaluate(p_eval, state, config, spec, devices) -> dict:
  """Top-1 accuracy and loss over the whole test split, each example once."""
  split = 'validation' if config.dataset == 'imagenet2012' else 'test'
  totals = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
  for batch in images.eval_batches(
    common.open_split(config, split),
    spec,
    global_batch_size=config.eval_batch_size,
    num_devices=len(devices),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    sums = jax.device_get(p_eval(state, batch))
    for k in totals:
      totals[k] += float(sums[k][0])
  return {
    'accuracy': totals['correct'] / totals['count'],
    'loss': totals['loss'] / totals['count'],
    'examples': totals['count'],
  }


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates."""
  devices = common.local_devices(config)
  num_classes = NUM_CLASSES[config.dataset]
  spec = image_spec(config)
  train_source = common.open_split(config, 'train')
  steps_per_epoch = len(train_source) // config.batch_size
  total_steps = (
    config.num_train_steps
    if config.get('num_train_steps', -1) > 0
    else int(config.num_epochs * steps_per_epoch)
  )
  train_data = images.train_dataset(
    train_source,
    spec,
    global_batch_size=config.batch_size,
    seed=config.seed,
    num_devices=len(devices),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )

  model, overrides = common.build_model(config, num_classes)
  variables = model.init(
    jax.random.key(config.seed), jnp.zeros((1, spec.image_size, spec.image_size, len(spec.mean)))
  )
  schedule = schedules.from_config(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedule, variables['params'], overrides)
  sparse = config.method == 'topkast'
  state, checkpointer = loop.initial_state(config, workdir, tx, variables)
  start = int(state.step)

  p_train = jax.pmap(
    functools.partial(
      classification.train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      num_classes=num_classes,
      label_smoothing=config.label_smoothing,
      sparse=sparse,
    ),
    axis_name=classification.AXIS,
    devices=common.pmap_devices(devices),
    donate_argnums=(0,),
  )
  p_eval = jax.pmap(
    functools.partial(classification.eval_step, model=model, sparse=sparse),
    axis_name=classification.AXIS,
    devices=common.pmap_devices(devices),
  )
  prefetch = common.Prefetcher(train_data, start, total_steps)
  try:
    state, history, seconds = loop.train(
      config,
      workdir,
      state=replicate(state, len(devices)),
      start=start,
      total_steps=total_steps,
      train_step=lambda state, step: p_train(state, prefetch.get(step)),
      evaluate=lambda state: evaluate(p_eval, state, config, spec, devices),
      describe=lambda r: (
        f'accuracy {r["accuracy"]:.4f} loss {r["loss"]:.4f} ({int(r["examples"])} examples)'
      ),
      eval_name='eval',
      checkpointer=checkpointer,
    )
  finally:
    prefetch.close()
  results = common.summary(
    config,
    'image_classification',
    total_steps,
    start,
    seconds,
    history,
    unreplicate(state),
    sparse,
    final_eval=history[-1] if history else evaluate(p_eval, state, config, spec, devices),
  )
  common.write_results(workdir, results)
  return results
