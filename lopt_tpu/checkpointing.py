"""Orbax checkpoints of the complete outer state, so a killed run resumes exactly.

Orbax writes each step into a temporary directory and renames it when complete, so a
checkpoint cut off mid-write is never listed, and never loaded.
"""

import os
from typing import Any, Dict, List, Optional, Tuple

from etils import epath
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps the newest `keep`."""

  def __init__(self, directory: str, keep: int = 3):
    # A remote path (gs://...) as it is: os.path.abspath made it a local ./gs:/ path.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    # The handler named, so that reading a step's metadata (`extra`) knows the item's format.
    self.manager = ocp.CheckpointManager(epath.Path(self.directory), options=options,
                                         item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore_latest(self, target: Any) -> Tuple[Any, int]:
    """(restored state, its step), or (target, 0) when there is no checkpoint yet.

    `target` gives the tree structure, shapes and dtypes (e.g. a freshly initialized state).
    """
    step = self.manager.latest_step()
    if step is None:
      return target, 0
    return self.restore(step, target), int(step)

  def steps(self) -> List[int]:
    """Steps of the kept (complete) checkpoints, oldest first."""
    return sorted(int(step) for step in self.manager.all_steps())

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, restored into the structure of `target`."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def save(self, step: int, state: Any, extra: Optional[Dict[str, Any]] = None):
    """Saves `state` at `step`, with `extra` (JSON-able, e.g. a partly filled metrics window)
    in the step's metadata, read back by `extra(step)`."""
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True,
                      custom_metadata=extra or {})

  def extra(self, step: int) -> Dict[str, Any]:
    """What `save` stored as `extra` at `step` ({} for checkpoints saved without it)."""
    return dict(self.manager.metadata(step).custom_metadata or {})

  def close(self):
    """Waits for asynchronous writes; call before exiting."""
    self.manager.wait_until_finished()
    self.manager.close()
