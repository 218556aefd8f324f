"""Packaging for topkast_jax: the metadata is in pyproject.toml (PEP 621); this file is kept
for tools that still call setup.py."""

import setuptools

setuptools.setup()
