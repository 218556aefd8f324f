"""Every Python block in the README runs, and its printed claims hold."""

import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    return re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)


def test_readme_python_blocks_run():
  blocks = python_blocks()
  assert len(blocks) >= 2
  for block in blocks:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(block, 'README.md', 'exec'), {})
    # A line `print(...)  # text` in the README claims that `text` is printed.
    for claim in re.findall(r'print\(.*\)\s+# (.+)', block):
      assert claim.strip() in out.getvalue(), (claim, out.getvalue())
