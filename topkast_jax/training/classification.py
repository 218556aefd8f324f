"""The image classification task: ResNets on Fashion-MNIST, CIFAR-10 and ImageNet.

Steps are pure functions for ``jax.pmap(axis_name='batch')``; the task carries nothing from
step to step (its carry is None).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from topkast_jax import models
from topkast_jax.data import images, sources
from topkast_jax.training import results
from topkast_jax.training import state as state_lib

NUM_CLASSES = {'fashion_mnist': 10, 'cifar10': 10, 'imagenet2012': 1000}
RESNETS = {f'resnet{depth}': getattr(models, f'ResNet{depth}') for depth in (18, 34, 50, 101)}


class Classification:
  """Data, model, steps and evaluation of an image classification run."""

  name, eval_name, has_carry = 'image_classification', 'eval', False

  def __init__(self, config, devices):
    self.config, self.devices = config, devices
    spec = images.SPECS[config.dataset]
    if config.image_size:  # smaller inputs for tests and quick runs
      resize = None if spec.eval_resize is None else config.image_size * 8 // 7
      spec = dataclasses.replace(spec, image_size=config.image_size, eval_resize=resize)
    self.spec = spec
    self._layout = layout = state_lib.data_layout(devices)
    train_source, self._eval_source = (
      sources.open_split(config.dataset, split, config.data_dir or None, config.prepare_data)
      for split in ('train', 'validation' if config.dataset == 'imagenet2012' else 'test')
    )
    self.steps_per_epoch = len(train_source) // config.batch_size
    epochs = int(config.num_epochs * self.steps_per_epoch)
    self.total_steps = config.num_train_steps if config.num_train_steps > 0 else epochs
    self.train_data = images.train_dataset(
      train_source, spec, global_batch_size=config.batch_size, seed=config.seed, **layout
    )
    self.model = RESNETS[config.model.name](
      num_classes=NUM_CLASSES[config.dataset],
      bn_axis_name=state_lib.AXIS,
      dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
      **{k: v for k, v in config.model.items() if k != 'name'},
    )
    self.sparsity_overrides = models.resnet_sparsity() if config.sparsity.dense_first_last else None

  def init_variables(self, key):
    size, channels = self.spec.image_size, len(self.spec.mean)
    return self.model.init(key, jnp.zeros((1, size, size, channels)))

  def initial_carry(self):
    return None

  def train_step(self, state: state_lib.TrainState, carry, batch, *, tx, schedule, sparse: bool):
    """One step: gradient w.r.t. the forward parameters, averaged over devices, then tx."""

    def loss_fn(params):
      logits, updates = self.model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        batch['image'],
        train=True,
        mutable=['batch_stats'],
      )
      one_hot = jax.nn.one_hot(batch['label'], NUM_CLASSES[self.config.dataset])
      targets = optax.smooth_labels(one_hot, self.config.label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, (logits, updates['batch_stats'])

    (loss, (logits, batch_stats)), grads = state_lib.value_and_grad_at_forward(
      loss_fn, state, sparse
    )
    new_state = state_lib.apply_gradients(state, grads, tx, batch_stats=batch_stats)
    metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'learning_rate': schedule(state.step),
    }
    return new_state, carry, jax.lax.pmean(metrics, state_lib.AXIS)

  def eval_step(self, state: state_lib.TrainState, carry, batch, *, sparse: bool):
    """Summed loss, correct predictions and example count over the real (mask 1) examples."""
    logits = self.model.apply(
      {'params': state_lib.forward_params(state, sparse), 'batch_stats': state.batch_stats},
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
    return carry, jax.lax.psum(sums, state_lib.AXIS)

  def evaluate(self, p_eval, state) -> dict:
    """Top-1 accuracy and loss over the whole test split, each example once."""
    batches = images.eval_batches(
      self._eval_source, self.spec, global_batch_size=self.config.eval_batch_size, **self._layout
    )
    totals = results.evaluation_sums(p_eval, state, None, batches)
    return {
      'accuracy': totals['correct'] / totals['count'],
      'loss': totals['loss'] / totals['count'],
      'examples': totals['count'],
    }

  @staticmethod
  def describe(r: dict) -> str:
    return f'accuracy {r["accuracy"]:.4f} loss {r["loss"]:.4f} ({int(r["examples"])} examples)'

  def final_results(self, history, evaluate) -> dict:
    return {'final_eval': history[-1] if history else evaluate()}
