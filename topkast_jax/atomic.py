"""Files written whole or not at all, and never through a file or link planted at a fixed name."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_file(path: str, mode: str = 'w', **kwargs):
  """A file object whose contents replace ``path`` when the ``with`` block ends without error.

  It writes to a new temporary file beside ``path`` (created exclusively, so nothing already
  there, a symlink included, is followed or overwritten) and renames it over ``path``; if the
  block fails, ``path`` is left as it was and the temporary file is removed.
  """
  folder = os.path.dirname(path) or '.'
  fd, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
  try:
    os.fchmod(fd, 0o644)  # as an ordinary new file (mkstemp's are private)
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temporary)
    raise
