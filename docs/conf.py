"""Sphinx configuration of the topkast_jax documentation (MyST pages and notebooks)."""

import os
import sys

sys.path.insert(0, os.path.abspath('..'))
import topkast_jax  # noqa: E402

project = 'topkast_jax'
author = 'The topkast_jax authors'
copyright = '2026, The topkast_jax authors'
release = version = topkast_jax.__version__

extensions = [
  'myst_nb',
  'sphinx.ext.autodoc',
  'sphinx.ext.autosummary',
  'sphinx.ext.napoleon',
  'sphinx.ext.viewcode',
]
exclude_patterns = ['_build', 'jupyter_execute', '.jupyter_cache']
myst_enable_extensions = ['dollarmath', 'colon_fence']
myst_heading_anchors = 3

# Tutorials are executed at every build, on the real Fashion-MNIST; an error fails the build.
nb_execution_mode = 'force'
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True

autodoc_typehints = 'description'
autodoc_member_order = 'bysource'
autodoc_default_options = {'members': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
default_role = 'code'  # `name` in docstrings reads as code

html_theme = 'sphinx_book_theme'
html_title = 'topkast_jax'
html_theme_options = {'show_toc_level': 2}
