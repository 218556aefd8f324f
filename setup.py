"""Packaging for topkast_jax: a light core, the experiment stack as an extra."""

import re

import setuptools

with open('topkast_jax/__init__.py', encoding='utf-8') as f:
  VERSION = re.search(r"^__version__ = '([^']+)'", f.read(), re.M).group(1)

# What the experiments, models, data pipelines and benchmarks need beyond the core.
EXPERIMENTS = [
  'absl-py',
  'array_record',
  'flax',
  'grain',
  'importlib_resources',  # tfds imports it at run time without declaring it
  'matplotlib',
  'ml-collections',
  'orbax-checkpoint',
  'pillow',
  'tensorboardX',
  'tensorflow-datasets',
]

setuptools.setup(
  name='topkast_jax',
  version=VERSION,
  description='Top-KAST sparse training (Jayakumar et al., NeurIPS 2020) for JAX, Flax and optax.',
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  license='Apache-2.0',
  python_requires='>=3.11',
  packages=setuptools.find_packages(include=['topkast_jax', 'topkast_jax.*']),
  # `import topkast_jax` (topkast, sparse_params, metrics, top-k) needs only these.
  install_requires=['chex', 'jax', 'numpy', 'optax'],
  extras_require={
    'models': ['flax'],  # topkast_jax.models alone
    'experiments': EXPERIMENTS,
    'test': EXPERIMENTS + ['pytest', 'pytest-xdist', 'ruff'],
    # Only to prepare ImageNet with TFDS's builder; every other data set prepares without it.
    'tf': ['tensorflow'],
  },
  classifiers=[
    'Programming Language :: Python :: 3',
    'Topic :: Scientific/Engineering :: Artificial Intelligence',
  ],
)
