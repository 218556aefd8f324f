"""One run per workdir at a time: an advisory lock on ``workdir/.lock`` held while training.

The kernel releases the lock when its process ends, however it ends (kill -9 included), so a
crashed run never leaves a stale lock behind.
"""

import contextlib
import fcntl
import os


class WorkdirBusyError(RuntimeError):
  """Another process is training in this workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds ``workdir``'s lock for the ``with`` block; WorkdirBusyError if another process
  holds it, naming that process."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, '.lock')
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors='replace').strip() or 'unknown'
      raise WorkdirBusyError(
        f'{os.path.abspath(workdir)} is in use by another run (process {holder}): wait for it '
        'to finish, or give this run another --workdir.'
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
