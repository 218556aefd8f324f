"""``train_and_evaluate(config, workdir)``: runs the experiment that ``config.task`` names."""

from topkast_jax.training import image_loop, lm_loop


def train_and_evaluate(config, workdir: str) -> dict:
  if config.task == 'image_classification':
    return image_loop.train_and_evaluate(config, workdir)
  if config.task == 'language_modeling':
    return lm_loop.train_and_evaluate(config, workdir)
  raise ValueError(
    f"config.task must be 'image_classification' or 'language_modeling', got {config.task!r}."
  )
