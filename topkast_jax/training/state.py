"""Train state, the devices it lives on, and moving it onto and off them."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import topkast_jax

AXIS = 'batch'  # the pmapped device axis of every step


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: train steps done
  params: Any  # dense parameters theta
  batch_stats: Any  # BatchNorm running statistics ({} for models without)
  opt_state: Any  # optimizer state (holds the Top-KAST masks under Top-KAST)
  rng: jax.Array  # uint32 [2]: raw key data, so checkpoints hold plain arrays


def forward_params(state: TrainState, sparse: bool):
  """The parameters the network runs on: alpha under Top-KAST, theta otherwise."""
  return topkast_jax.sparse_params(state.params, state.opt_state) if sparse else state.params


def value_and_grad_at_forward(loss_fn, state: TrainState, sparse: bool):
  """``(loss, aux), grads`` of ``loss_fn(params) -> (loss, aux)`` at `forward_params`, through
  `topkast_jax.sparse_value_and_grad` when sparse (no second copy of the kernels in memory)."""
  if sparse:
    return topkast_jax.sparse_value_and_grad(loss_fn, has_aux=True)(state.params, state.opt_state)
  return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


def apply_gradients(state: TrainState, grads, tx, **changes) -> TrainState:
  """Averages ``grads`` over devices and applies ``tx``: the next step's state."""
  updates, opt_state = tx.update(jax.lax.pmean(grads, AXIS), state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **changes)


def data_layout(devices) -> dict:
  """How this process's share of a global batch is split: the pipelines' layout arguments."""
  count, index = jax.process_count(), jax.process_index()
  return dict(num_devices=len(devices), process_index=index, process_count=count)


def local_devices(config):
  """The devices this process feeds (``config.num_devices`` > 0 limits it, single-process)."""
  devices = jax.local_devices()
  if config.num_devices:
    if jax.process_count() > 1:
      raise ValueError(
        'config.num_devices limits devices only in single-process runs; set it to 0.'
      )
    devices = devices[: config.num_devices]
  return devices


def pmap(fn, devices, **kwargs):
  """``jax.pmap`` over ``AXIS`` on ``devices``, or on every device of every process when there
  are several processes (only the local ones would make each process reduce over its own)."""
  devices = None if jax.process_count() > 1 else devices
  return jax.pmap(fn, axis_name=AXIS, devices=devices, **kwargs)


def replicate(tree, devices):
  """Copies of every leaf along a new leading axis, on ``devices`` as `pmap` returns them.

  A step first called on host arrays compiles again once its own outputs come back (jax keys
  its programs on the inputs' shardings): two compiles of each train step, not one.
  """
  copies = jax.tree.map(
    lambda x: np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), tree
  )
  return pmap(lambda x: x, devices)(copies)


def first_replica(tree):
  """The first local device's copy of a pmapped tree, left on that device (read from the shard:
  ``x[0]`` would run a computation whose collectives can deadlock across CPU processes)."""

  def first(x):
    if isinstance(x, jax.Array):
      return x.addressable_shards[0].data[0]
    return np.asarray(x)[0]

  return jax.tree.map(first, tree)


def unreplicate(tree):
  """The first local device's copy of a pmapped tree, as host numpy arrays."""
  return jax.device_get(first_replica(tree))


def step_key(state: TrainState, axis_name: str | None = None) -> jax.Array:
  """A fresh key per step (and per device when ``axis_name`` is given, for dropout)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  return key


def new_rng(seed: int) -> jax.Array:
  return jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
