"""Orbax checkpoints of the train state, the task's carry, the run's identity (the config
less the fields a resume may change) and a CRC-32 of every array. Restoring refuses another
run's checkpoint and moves an unreadable one aside (``unreadable_<step>``, with a warning) for
the newest that restores; an array whose bytes differ from their checksum makes a checkpoint
unreadable (orbax checks its metadata, not the array chunks)."""

import logging
import os
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from topkast_jax.sparsity import path_name

# Fields a resumed run may change: how long, how often, where from, on how many devices.
RESUMABLE = set(
  'data_dir prepare_data num_train_steps num_epochs log_every_steps eval_every_steps '
  'checkpoint_every_steps max_checkpoints num_devices sync_every_step eval_batch_size '
  'eval_tgt_len eval_mem_len'.split()
)


def run_identity(config) -> dict:
  """The config as flat ``{'a.b': value}``, without the `RESUMABLE` fields."""

  def flat(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from flat(v, f'{prefix}{k}.')
      elif f'{prefix}{k}' not in RESUMABLE:
        yield f'{prefix}{k}', list(v) if isinstance(v, tuple) else v

  return dict(flat(config.to_dict()))


def checksums(tree) -> dict:
  """``{path: CRC-32 of the array's bytes}`` of every leaf of ``tree``."""
  return {
    path_name(p): zlib.crc32(np.ascontiguousarray(jax.device_get(x)).tobytes())
    for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


class CorruptCheckpointError(ValueError):
  """A restored array's bytes differ from the checksum saved with it."""


class RunMismatchError(ValueError):
  """The workdir's checkpoints belong to a run with other settings."""


class Checkpointer:
  """Saves and restores host-side pytrees by step; process 0 writes, every process reads.

  Each process's manager involves only itself, so no cross-process barrier runs (orbax's
  barrier is a device all-gather, which hangs over CPU collectives).
  """

  def __init__(self, directory: str, max_to_keep: int, run: dict, total_steps: int = 0):
    me = jax.process_index()
    self.directory, self.run, self._writer = os.path.abspath(directory), run, me == 0
    self.total_steps = total_steps  # saved with each step: a resume says if it changed
    if self._writer:
      os.makedirs(self.directory, exist_ok=True)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me}
        ),
      ),
    )

  def save(self, step: int, state, carry=None) -> None:
    """Saves at ``step`` (process 0) and waits, so a saved step is complete on disk."""
    if not self._writer:
      return
    saved = {'state': state} if carry is None else {'state': state, 'carry': carry}
    items = dict(
      state=ocp.args.StandardSave(state),
      run=ocp.args.JsonSave(self.run),
      checksums=ocp.args.JsonSave(checksums(saved)),
      schedule=ocp.args.JsonSave({'total_steps': self.total_steps}),
    )
    if carry is not None:
      items['carry'] = ocp.args.StandardSave(carry)
    self._manager.save(int(step), args=ocp.args.Composite(**items))
    self._manager.wait_until_finished()

  def _check_run(self, step: int) -> None:
    saved = self._manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))['run']
    get = lambda run, k: run.get(k, '(absent)')  # noqa: E731
    differ = [k for k in sorted(set(saved) | set(self.run)) if get(saved, k) != get(self.run, k)]
    if differ:
      shown = '; '.join(
        f'{k}: checkpoint {get(saved, k)!r}, config {get(self.run, k)!r}' for k in differ
      )
      raise RunMismatchError(
        f'{self.directory} holds checkpoints of a different run (step {step}): {shown}. Resume '
        f'with the same settings, or start afresh with another --workdir (or remove {self.directory}).'
      )

  def _verify(self, step: int, restored: dict) -> None:
    """CorruptCheckpointError unless every restored array matches its saved checksum (a
    checkpoint saved before checksums were written is taken as it is)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), 'checksums')):
      logging.warning(f'checkpoint {step} in {self.directory} has no checksums: not verified.')
      return
    args = ocp.args.Composite(checksums=ocp.args.JsonRestore())
    saved = self._manager.restore(step, args=args)['checksums']
    found = checksums(restored)
    differ = [k for k in found if saved.get(k) != found[k]]
    if differ or saved.keys() != found.keys():
      raise CorruptCheckpointError(
        f'arrays whose bytes differ from their checksum: {(differ or sorted(saved.keys() ^ found.keys()))[:5]}'
      )

  def _warn_if_stretched(self, step: int) -> None:
    """Warns when a run resumes mid-way with another total of steps than it was saved with:
    schedules are functions of the total, so the learning rate changes from here on."""
    if not os.path.isdir(os.path.join(self.directory, str(step), 'schedule')):
      return
    args = ocp.args.Composite(schedule=ocp.args.JsonRestore())
    saved = self._manager.restore(step, args=args)['schedule']['total_steps']
    if saved != self.total_steps and step < self.total_steps:
      logging.warning(
        f'resuming step {step} of a run saved with {saved} steps in all, now '
        f'{self.total_steps}: the learning-rate schedule, stretched to the new total, changes '
        'from this step on.'
      )

  def restore(self, state_template, with_carry: bool):
    """``(step, state, carry)`` of the newest checkpoint that restores, or None without one;
    RunMismatchError for another run's checkpoints, RuntimeError if none restores."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    for step in steps:
      try:
        self._check_run(step)
        items = dict(state=ocp.args.StandardRestore(abstract))
        if with_carry:
          items['carry'] = ocp.args.StandardRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        self._verify(step, {k: restored[k] for k in ('state', 'carry') if k in items})
        self._warn_if_stretched(step)
        return step, restored['state'], restored['carry'] if with_carry else None
      except RunMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read means: try an older one
        self._set_aside(step, e)
    if steps:
      raise RuntimeError(
        f'none of the checkpoints in {self.directory} (steps {steps}) can be restored; they '
        f'were moved aside as unreadable_<step>. Start afresh with another --workdir, or '
        f'remove them: rm -rf {self.directory}'
      )
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    path, aside = (os.path.join(self.directory, f'{p}{step}') for p in ('', 'unreadable_'))
    while os.path.exists(aside):
      aside += '_'
    reason = f'{type(error).__name__}: {str(error)[:300]}'
    logging.warning(f'checkpoint {path} cannot be restored ({reason}); moved to {aside}.')
    if self._writer and os.path.exists(path):
      os.replace(path, aside)
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
