"""Every Python block of the README and of the guides runs, and its printed claims hold (the
tutorials and the method page are MyST notebooks, executed when the docs are built)."""

import contextlib
import glob
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md'] + sorted(
  os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', 'guides', '*.md'))
)


def python_blocks(page):
  with open(os.path.join(ROOT, page), encoding='utf-8') as f:
    return re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)


def test_the_pages_hold_their_examples():
  assert len(python_blocks('README.md')) == 1  # the front page's short example
  assert sum(len(python_blocks(p)) for p in PAGES) >= 8


@pytest.mark.parametrize('page', [p for p in PAGES if python_blocks(p)])
def test_python_blocks_run(page):
  for block in python_blocks(page):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(block, page, 'exec'), {})
    # A line `print(...)  # text` claims that `text` is printed.
    for claim in re.findall(r'print\(.*\)\s+# (.+)', block):
      assert claim.strip() in out.getvalue(), (page, claim, out.getvalue())
