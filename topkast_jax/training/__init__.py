"""Training-loop pieces for the experiments: schedules, optimizers, steps, checkpoints, logs."""

from topkast_jax import extras

extras.require(__name__, 'experiments', extras.EXPERIMENTS)
