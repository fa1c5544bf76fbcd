"""Orbax checkpoints of the train state and the data position, with resume.

Directories are epath paths (local or gs://...); orbax coordinates the writes of
every process of a multi-process run itself.

Resume takes the newest checkpoint that restores. One that does not restore
although its saved tree matches this model (a truncated array file, garbage in
its metadata, missing files) is damaged: it is moved aside to
`<stage dir>/corrupt-<step>/` (never deleted) with a one-line warning naming the
cause, and the next older one is tried. Only a saved tree that differs from the
model (other paths or shapes) is a mismatch, a CheckpointError.

Saves are asynchronous. A save that fails (disk full, any I/O error) is found at
the next step boundary (`poll`) or when waited for, and becomes a one-line
StorageError naming the directory and its free space; its temporary directory
is removed, and the older checkpoints are untouched.
"""

import os
import re
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moejax.errors import CheckpointError, StorageError, storage_error, warn
from moejax.parallel import hosts
from moejax.paths import as_path

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_OS_ERROR_RE = re.compile(r"os_error_code='?(\d+)")


class DamagedCheckpoint(Exception):
  """A checkpoint whose files cannot be read back; `str()` is the cause."""


def _cause(error: BaseException) -> str:
  """One short line for `error`: the storage layer's status message if one is
  in the exception chain (e.g. 'OUT_OF_RANGE: Error reading ...'), else the
  first line of the error itself."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  status = [e for e in chain if re.match(r"[A-Z_]{4,}: ", str(e))]
  top = status[0] if status else chain[0]
  text = str(top).strip().splitlines()[0] if str(top).strip() else ""
  text = text.split(" [tensorstore_spec")[0].split(". See full TensorStore")[0]
  if not status:
    text = f"{type(top).__name__}: {text}" if text else type(top).__name__
  return text[:240]


def _os_error(error: BaseException) -> OSError | None:
  """The OSError behind `error` (an orbax/tensorstore write failure), if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno is not None:
      return error
    match = _OS_ERROR_RE.search(str(error))
    if match:
      code = int(match[1])
      return OSError(code, os.strerror(code))
    error = error.__cause__ or error.__context__
  return None


def _tree_signature(tree) -> dict[str, tuple]:
  """Path -> (shape, dtype) of every leaf; the same for a TrainState, its
  abstract form and orbax's metadata of a saved one."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                   for k in path)
    out[key] = (tuple(leaf.shape), str(leaf.dtype))
  return out


class Checkpointer:
  """Saves `{"state": TrainState, "data": {"next_batch": int}}` every N steps.

  Wraps an orbax `CheckpointManager` rooted at `<workdir>/checkpoints/stage_<i>`.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
    self.directory = as_path(directory)
    self._max_to_keep = max_to_keep
    self._pending: int | None = None  # The step of a save not yet checked.
    self._failed = False
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    try:
      return ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=self._max_to_keep, create=True,
              cleanup_tmp_directories=True),  # Saves cut short by a kill.
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "data": ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise storage_error("checkpoints to", self.directory, e) from None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, *, next_batch: int) -> None:
    """Writes step `step` (asynchronously; `wait()` blocks until on disk)."""
    self.poll()
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave({"next_batch": int(next_batch)})), force=True)
    except Exception as e:  # pylint: disable=broad-except
      if _os_error(e) is None:
        raise
      raise self._save_failed(step, e) from None
    self._pending = step

  def poll(self) -> None:
    """Raises StorageError if the last save has ended in failure. Never
    blocks: a save still being written is checked later."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the last save is on disk; StorageError if it failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if step is None and self._failed:
        return  # orbax raises a failed save again; it was reported once.
      raise self._save_failed(step, e) from None

  def _save_failed(self, step: int | None, error: BaseException) -> StorageError:
    """Removes what the failed save left and says what is kept."""
    self._failed = True
    kept_steps = [s for s in self._manager.all_steps(read=True) if s != step]
    kept = (f"the last good checkpoint (step {max(kept_steps)}) is kept"
            if kept_steps else "no checkpoint of this stage was written")
    failure = storage_error(f"checkpoint step {step} to", self.directory,
                            _os_error(error) or _cause(error), kept=kept)
    if hosts.is_writer():  # After measuring the free space it left.
      for tmp in self.directory.glob(f"{step}{_TMP_SUFFIX}*"):
        tmp.rmtree(missing_ok=True)
    return failure

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, next_batch) at `step` (default: latest) onto the shapes,
    dtypes and shardings of `abstract_state`.

    Raises CheckpointError when the saved tree differs from `abstract_state`,
    DamagedCheckpoint when it matches but cannot be read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}; train first or "
                            "point --workdir at a run that saved one")
    try:
      data = self._manager.restore(step, args=ocp.args.Composite(
          data=ocp.args.JsonRestore()))["data"]
      next_batch = data["next_batch"]
      if isinstance(next_batch, bool) or not isinstance(next_batch, int):
        raise ValueError(f"data position {data!r} has no integer next_batch")
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(f"data position: {_cause(e)}") from None
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      self._check_matches(step, abstract_state)
      cause = _os_error(e)
      if cause is not None and cause.errno in (13, 1):  # EACCES, EPERM
        raise storage_error(f"checkpoint step {step} from", self.directory,
                            cause, fix="fix the permissions") from None
      raise DamagedCheckpoint(_cause(e)) from None
    return state, next_batch

  def _check_matches(self, step: int, abstract_state) -> None:
    """CheckpointError if the saved tree of `step` differs from
    `abstract_state`; DamagedCheckpoint if its metadata cannot be read."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      if saved is None:
        raise ValueError("no state in this checkpoint")
      saved = _tree_signature(saved)
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(f"metadata: {_cause(e)}") from None
    expected = _tree_signature(abstract_state)
    if saved == expected:
      return
    differ = sorted(k for k in set(saved) | set(expected)
                    if saved.get(k) != expected.get(k))
    first = differ[0]
    raise CheckpointError(
        f"checkpoint {step} in {self.directory} does not match this model "
        f"({len(differ)} arrays differ, e.g. {first}: saved "
        f"{saved.get(first, 'absent')}, model {expected.get(first, 'absent')}); "
        "use a new --workdir or the config that wrote it")

  def move_aside(self, step: int) -> str:
    """Renames step `step`'s directory to `corrupt-<step>` (or `-<n>` after it
    when taken) and forgets it; returns the new path."""
    root = self.directory
    target = root / f"corrupt-{step}"
    n = 1
    while target.exists():
      target, n = root / f"corrupt-{step}-{n}", n + 1
    if hosts.is_writer():
      (root / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"moejax_move_aside_{step}")
    self._manager.reload()
    return os.fspath(target)

  def close(self) -> None:
    """Waits for the last save (StorageError if it failed) and closes."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise


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

  def restore_newest(self, abstract_of: Callable[[int], Any]
                     ) -> tuple[int, int, Any, int] | None:
    """(stage, step, state, next_batch) of the newest checkpoint that restores
    onto `abstract_of(stage)`, None when none does; damaged ones are moved
    aside with a warning on the way (see the module docstring)."""
    for index in reversed(range(self.num_stages)):
      if not (self.root / f"stage_{index}").is_dir():
        continue
      checkpointer = self.stage(index)
      for step in reversed(checkpointer.all_steps()):
        try:
          state, next_batch = checkpointer.restore(abstract_of(index), step)
          damage = None
        except DamagedCheckpoint as e:
          damage = str(e)
        if hosts.all_processes(damage is None):
          return index, step, state, next_batch
        moved = checkpointer.move_aside(step)
        if hosts.is_writer():
          warn(f"checkpoint {checkpointer.directory}/{step} is damaged "
               f"({damage or 'unreadable on another process'}); moved it to "
               f"{moved} and resuming from the one before it")
    return None

  def poll(self) -> None:
    """Raises StorageError for a background save that failed (never blocks)."""
    for checkpointer in self._open.values():
      checkpointer.poll()

  def wait(self) -> None:
    """Blocks until every save is on disk; StorageError if one failed."""
    for checkpointer in self._open.values():
      checkpointer.wait()

  def close(self) -> None:
    """Closes every stage's checkpointer; raises the first failure after."""
    errors = []
    for checkpointer in self._open.values():
      try:
        checkpointer.close()
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
    if errors:
      raise errors[0]


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
