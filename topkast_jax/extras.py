"""Which optional extra a module needs: a clear error instead of a bare `No module named`."""

import importlib.util

EXPERIMENTS = ('flax', 'grain', 'orbax.checkpoint', 'ml_collections', 'tensorflow_datasets',
               'tensorboardX', 'PIL', 'array_record')  # fmt: skip


def _missing(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is None
  except ImportError:  # a parent package is missing
    return True


def require(module: str, extra: str, packages) -> None:
  """Raises ModuleNotFoundError naming the extra to install unless every package imports."""
  missing = [p for p in packages if _missing(p)]
  if missing:
    raise ModuleNotFoundError(
      f'{module} needs {", ".join(missing)}, which the core install of topkast_jax leaves out. '
      f"Install the extra: pip install 'topkast_jax[{extra}]'.",
      name=missing[0],
    )
