"""Transformer-XL ordered batching of a token stream, split per process and per device.

The stream's targets (tokens 1..N-1, each predicted from everything before it) are cut into
``batch_size`` contiguous rows of ``row_len`` targets; step s serves, for every row, the s-th
segment of ``tgt_len`` (inputs: the tokens just before the targets). Consecutive steps
therefore continue each row where the last one stopped, so Transformer-XL's memory carries
over. Process p owns rows ``[p * rows_per_process, (p + 1) * rows_per_process)``, and its
device d always the same slice of those, so a device's memory always follows the same rows.

Training (``exact=False``) drops what does not fill whole rows and segments, so every served
token is real. Evaluation (``exact=True``) pads the last row and segment and marks padding with
``mask == 0``: every target of the split is counted exactly once.

Batches are a pure function of the step (``batches[step]``, wrapping around each epoch), so
resuming needs only the step.
"""

import math

import numpy as np


class LanguageModelBatches:
  """Indexable segments ``{'inputs', 'targets', 'mask'}``, each ``[devices, rows, tgt_len]``."""

  def __init__(
    self,
    tokens,
    *,
    batch_size: int,
    tgt_len: int,
    num_devices: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    exact: bool = False,
  ):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f'tokens must be a 1-D integer stream, got {tokens.dtype} {tokens.shape}.')
    if batch_size % (process_count * num_devices):
      raise ValueError(
        f'batch_size ({batch_size}) must divide evenly over {process_count} '
        f'processes x {num_devices} devices.'
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
    if tgt_len < 1:
      raise ValueError(f'tgt_len must be >= 1, got {tgt_len}.')
    targets = len(tokens) - 1
    row_len = math.ceil(targets / batch_size) if exact else targets // batch_size
    if row_len < (1 if exact else tgt_len):
      raise ValueError(
        f'a stream of {len(tokens)} tokens is too short for {batch_size} rows '
        f'of segments of {tgt_len}.'
      )
    self.tokens, self.batch_size, self.tgt_len = tokens, batch_size, tgt_len
    self.num_devices, self.exact = num_devices, exact
    self.row_len = row_len
    self.num_segments = math.ceil(row_len / tgt_len) if exact else row_len // tgt_len
    rows_per_process = batch_size // process_count
    self.rows = np.arange(process_index * rows_per_process, (process_index + 1) * rows_per_process)

  def __len__(self) -> int:
    """Segments per pass over the stream (one epoch)."""
    return self.num_segments

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    segment = step % self.num_segments
    offsets = segment * self.tgt_len + np.arange(self.tgt_len)  # target offsets within a row
    target_pos = 1 + self.rows[:, None] * self.row_len + offsets[None, :]
    valid = (offsets[None, :] < self.row_len) & (target_pos < len(self.tokens))
    safe = np.where(valid, target_pos, 1)
    batch = {
      'inputs': np.where(valid, self.tokens[safe - 1], 0).astype(np.int32),
      'targets': np.where(valid, self.tokens[safe], 0).astype(np.int32),
      'mask': valid.astype(np.float32),
    }
    shape = (self.num_devices, len(self.rows) // self.num_devices, self.tgt_len)
    return {k: v.reshape(shape) for k, v in batch.items()}

  def __iter__(self):
    """One epoch, in order."""
    return (self[s] for s in range(self.num_segments))
