"""Learning-rate schedules of the paper's experiments."""

import jax.numpy as jnp
import optax


def stepwise_with_warmup(
  *,
  base_lr: float,
  steps_per_epoch: int,
  warmup_epochs: float,
  decay_epochs,
  decay_factor: float = 0.1,
) -> optax.Schedule:
  """ImageNet recipe (Goyal et al. 2017, as in RigL and Top-KAST): linear warm-up from 0 over
  ``warmup_epochs``, then ``base_lr`` times ``decay_factor`` per passed epoch in
  ``decay_epochs`` (e.g. 30, 70, 90)."""
  warmup_steps = max(1, int(warmup_epochs * steps_per_epoch))
  boundaries = jnp.asarray([int(e * steps_per_epoch) for e in decay_epochs])

  def schedule(step):
    warmup = jnp.minimum(1.0, (step + 1) / warmup_steps)
    decays = jnp.sum(step >= boundaries)
    return base_lr * warmup * decay_factor**decays

  return schedule


def from_config(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The schedule named by ``config.schedule.name``."""
  s = config.schedule
  if s.name == 'stepwise':
    base = s.base_lr_per_256 * config.batch_size / 256
    return stepwise_with_warmup(
      base_lr=base,
      steps_per_epoch=steps_per_epoch,
      warmup_epochs=s.warmup_epochs,
      decay_epochs=s.decay_epochs,
    )
  if s.name == 'warmup_cosine':  # the Transformer-XL recipe
    decay_steps = max(total_steps, s.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
      s.init_lr, s.peak_lr, s.warmup_steps, decay_steps, end_value=s.end_lr
    )
  raise ValueError(f"schedule.name must be 'stepwise' or 'warmup_cosine', got {s.name!r}.")
