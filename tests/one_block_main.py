"""``experiments/main.py`` with the driver's ResNets at one block per stage, for the tests that
run the program itself (in process: the ``one_block_resnets`` fixture of conftest.py).

  python tests/one_block_main.py --config ... --workdir ...
"""

import functools
import os
import runpy
import sys

from topkast_jax.training import classification

MAIN = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'main.py'
)


def one_block_resnets() -> dict:
  """name -> the driver's ResNet of that name with one block per stage (each keeps its block
  kind, stem and four stages)."""
  return {
    name: functools.partial(model, stage_sizes=(1, 1, 1, 1))
    for name, model in classification.RESNETS.items()
  }


if __name__ == '__main__':
  classification.RESNETS.update(one_block_resnets())
  sys.argv[0] = MAIN
  runpy.run_path(MAIN, run_name='__main__')
