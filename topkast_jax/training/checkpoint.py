"""Checkpoints with orbax: atomic (written to a temporary folder, then renamed), latest kept."""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores a host-side pytree (the unreplicated train state) by step.

  The state is replicated, so process 0 alone writes it; every process reads it back from the
  shared directory. Each process's manager involves only itself, so no cross-process barrier
  runs (orbax's barrier is a device all-gather, which hangs over CPU collectives).
  """

  def __init__(self, directory: str, max_to_keep: int = 3):
    me = jax.process_index()
    self._writer = me == 0
    if self._writer:
      os.makedirs(directory, exist_ok=True)
    self._manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me}
        ),
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree) -> None:
    """Saves ``tree`` at ``step`` (process 0) and waits, so a saved step is complete on disk."""
    if not self._writer:
      return
    self._manager.save(int(step), args=ocp.args.StandardSave(tree))
    self._manager.wait_until_finished()

  def restore_latest(self, template):
    """The latest checkpoint shaped like ``template``, or None when there is none."""
    step = self.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self._manager.close()
