"""Orbax checkpoints of the train state and the data position, with resume.

Directories are epath paths (local or gs://...); orbax coordinates the writes of
every process of a multi-process run itself.
"""

import os

import jax
import orbax.checkpoint as ocp

from moejax.errors import CheckpointError
from moejax.paths import as_path


class Checkpointer:
  """Saves `{"state": TrainState, "data": {"next_batch": int}}` every N steps.

  Wraps an orbax `CheckpointManager` rooted at `<workdir>/checkpoints`.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
    self.directory = os.fspath(directory)
    self._manager = ocp.CheckpointManager(
        as_path(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, *, next_batch: int) -> None:
    """Writes step `step` (asynchronously; `wait()` blocks until on disk)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"next_batch": int(next_batch)})), force=True)

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, next_batch) at `step` (default: latest) onto the shapes,
    dtypes and shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}; train first or "
                            "point --workdir at a run that saved one")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} does not match this model "
          f"({first[:200]}); use a new --workdir or the config that wrote it"
      ) from None
    return restored["state"], int(restored["data"]["next_batch"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings where known) of a pytree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None)), tree)


class StageCheckpoints:
  """One `Checkpointer` per stage, at `<root>/stage_<i>`: a transform may change
  the tree between stages, and orbax never changes shapes on restore."""

  def __init__(self, root: str | os.PathLike, num_stages: int, *,
               max_to_keep: int | None = 3):
    self.root = as_path(root)
    self.num_stages = num_stages
    self._max_to_keep = max_to_keep
    self._open: dict[int, Checkpointer] = {}

  def stage(self, index: int) -> Checkpointer:
    if index not in self._open:
      self._open[index] = Checkpointer(self.root / f"stage_{index}",
                                       max_to_keep=self._max_to_keep)
    return self._open[index]

  def latest(self) -> tuple[int, int] | None:
    """(stage, step) of the newest checkpoint, None when there is none."""
    for index in reversed(range(self.num_stages)):
      if (self.root / f"stage_{index}").is_dir():
        step = self.stage(index).latest_step()
        if step is not None:
          return index, step
    return None

  def close(self) -> None:
    for checkpointer in self._open.values():
      checkpointer.close()


def _whole_on_local_device(metadata) -> dict:
  """Restore targets that put each saved array whole on this process's first
  device, whatever mesh and processes saved it."""
  tree = getattr(metadata, "tree", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def restore_params(directory: str | os.PathLike) -> tuple[dict, dict]:
  """(params, model_state) of the newest checkpoint of the last stage under
  `directory` (a run's `checkpoints/`), for `train.init_from`: every process
  gets the whole arrays on its first device (the saving run's mesh and process
  count may differ from this one's)."""
  directory = as_path(directory)
  stages = sorted((d.name for d in directory.iterdir()
                   if d.name.startswith("stage_")),
                  key=lambda d: int(d.split("_")[1])) if directory.is_dir() else []
  for name in reversed(stages):
    manager = ocp.CheckpointManager(
        directory / name, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                         "data": ocp.JsonCheckpointHandler()})
    step = manager.latest_step()
    if step is not None:
      target = _whole_on_local_device(manager.item_metadata(step)["state"])
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
      manager.close()
      state = restored["state"]
      return state["params"], state.get("model_state", {})
    manager.close()
  raise CheckpointError(f"no checkpoint under {directory}; point train.init_from "
                        "at the workdir of a finished run")
