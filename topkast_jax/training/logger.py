"""Metrics to the console (with progress), a JSONL file and TensorBoard, from process 0."""

import json
import os
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter

from topkast_jax.atomic import atomic_file


def _format_seconds(seconds: float) -> str:
  hours, rest = divmod(int(seconds), 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


def _drop_rows_after(path: str, step: int) -> None:
  """Removes rows past ``step`` (written before a crash, replayed after the resume)."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    rows = f.readlines()
  kept = [r for r in rows if r.endswith('\n') and json.loads(r)['step'] <= step]
  if len(kept) < len(rows):
    with atomic_file(path, encoding='utf-8') as f:
      f.writelines(kept)


class MetricLogger:
  """Writes scalars to ``workdir/metrics.jsonl`` and ``workdir/tensorboard``; prints progress.

  Rows of ``metrics.jsonl`` past ``start_step`` (steps a resumed run replays) are dropped.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, name: str = ''):
    self.active = jax.process_index() == 0
    self.total_steps, self.name = total_steps, name
    self._start_time, self._start_step = time.perf_counter(), start_step
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      _drop_rows_after(path, start_step)
      self._jsonl = open(path, 'a', encoding='utf-8')
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict, prefix: str) -> None:
    if not self.active:
      return
    values = {f'{prefix}/{k}': float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
    for k, v in values.items():
      self._tensorboard.add_scalar(k, v, int(step))
    self._tensorboard.flush()

  def say(self, text: str) -> None:
    """A console line (process 0)."""
    if self.active:
      print(text, flush=True)

  def progress(self, step: int, scalars: dict) -> None:
    """One console line: step, steps/s, ETA and the given scalars."""
    if not self.active:
      return
    elapsed = time.perf_counter() - self._start_time
    rate = (step - self._start_step) / max(elapsed, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float('inf')
    shown = ' '.join(f'{k} {float(np.asarray(v)):.4g}' for k, v in scalars.items())
    print(
      f'{self.name}step {step}/{self.total_steps} {rate:.2f} steps/s '
      f'ETA {_format_seconds(eta) if np.isfinite(eta) else "?"} {shown}',
      flush=True,
    )

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tensorboard.close()
