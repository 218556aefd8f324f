"""Metrics to the console (with progress), a JSONL file and TensorBoard, from process 0."""

import json
import os
import time

import jax
import numpy as np


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return (
    f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
    if seconds >= 3600
    else f'{seconds // 60}m{seconds % 60:02d}s'
  )


class MetricLogger:
  """Writes scalars to ``workdir/metrics.jsonl`` and ``workdir/tensorboard``; prints progress."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, name: str = ''):
    self.active = jax.process_index() == 0
    self.total_steps, self.name = total_steps, name
    self._start_time, self._start_step = time.perf_counter(), start_step
    self._jsonl = self._tensorboard = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      try:
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:  # TensorBoard files are optional; JSONL always is written.
        self._tensorboard = None

  def write(self, step: int, scalars: dict, prefix: str) -> None:
    if not self.active:
      return
    values = {f'{prefix}/{k}': float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
    if self._tensorboard is not None:
      for k, v in values.items():
        self._tensorboard.add_scalar(k, v, int(step))
      self._tensorboard.flush()

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
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()
