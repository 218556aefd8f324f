"""Packaging for topkast_jax."""

import setuptools

setuptools.setup(
  name='topkast_jax',
  version='0.1.0',
  description='Top-KAST sparse training (Jayakumar et al., NeurIPS 2020) for JAX, Flax and optax.',
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  license='Apache-2.0',
  python_requires='>=3.11',
  packages=setuptools.find_packages(include=['topkast_jax', 'topkast_jax.*']),
  install_requires=[
    'absl-py',
    'array_record',
    'chex',
    'flax',
    'grain',
    'jax',
    'ml-collections',
    'numpy',
    'optax',
    'orbax-checkpoint',
    'pillow',
    'tensorboardX',
    'tensorflow-datasets',
    'importlib_resources',  # tfds imports it at run time without declaring it
    'matplotlib',
  ],
  extras_require={
    'test': ['pytest', 'ruff'],
    # Only to prepare ImageNet with TFDS's builder; every other data set prepares without it.
    'tf': ['tensorflow'],
  },
  classifiers=[
    'License :: OSI Approved :: Apache Software License',
    'Programming Language :: Python :: 3',
    'Topic :: Scientific/Engineering :: Artificial Intelligence',
  ],
)
