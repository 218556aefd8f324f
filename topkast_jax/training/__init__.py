"""Training-loop pieces for the experiments: schedules, optimizers, steps, checkpoints, logs."""
