"""Which process does what in a multi-process run: writes, barriers, host values.

Every host runs the same program (multi-controller JAX); on one process every
function here is the plain single-process behaviour. The rules of a run:
- one writer: process 0 (`is_writer()`) writes every workdir file that is not an
  orbax checkpoint (orbax coordinates its own writes across processes);
- prepared once: `main_first(fn, name=)` runs `fn` on process 0, then, after a
  barrier that carries its success or its error, on the other processes, which
  find what it wrote (`fn` must write only where `is_writer()` says so);
- host values: `fetch(tree)` gives numpy values of global arrays on every
  process (an array that spans other processes' devices is gathered with
  `process_allgather`; a replicated one is read from a local copy);
- global values: every process holds the same host values (the global batch,
  params restored for `train.init_from`, a router's prepared tables); `place`
  puts on each process the slices its own devices hold;
- `check_mesh_processes(devices)`: every process must own devices in the mesh.
"""

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from moejax import errors
from moejax.errors import ConfigError, MoejaxError

T = TypeVar("T")
_MESSAGE_BYTES = 2048  # Room for a one-line error from process 0.


def is_writer() -> bool:
  """True on process 0: the one that writes logs, metrics, configs and data."""
  return jax.process_index() == 0


def _error_class(name: str) -> type[MoejaxError]:
  cls = getattr(errors, name, None)
  if isinstance(cls, type) and issubclass(cls, MoejaxError):
    return cls
  return MoejaxError


def _attempt(fn: Callable[[], T], name: str
             ) -> tuple[T | None, Exception | None, str]:
  """(result, error, status) of calling `fn`; the status is "" or the error's
  class name and its one line, joined by a newline."""
  try:
    return fn(), None, ""
  except Exception as e:  # Every process must hear about it before it is raised.
    if isinstance(e, MoejaxError):
      return None, e, f"{type(e).__name__}\n{e}"
    return None, e, (f"MoejaxError\nprocess {jax.process_index()} failed in "
                     f"{name}: {type(e).__name__}: {e}")


def _agree(error: Exception | None, status: str) -> None:
  """Exchanges every process's `status`; raises on every process if one failed
  (this process's own error as is, another's as the same class and line)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = status.encode("utf-8")[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0")
  # One row of _MESSAGE_BYTES bytes per process.
  gathered = multihost_utils.process_allgather(np.frombuffer(raw, np.uint8))
  for row in np.asarray(gathered, np.uint8):
    text = bytes(row).rstrip(b"\0").decode("utf-8", "replace")
    if text:
      if error is not None:
        raise error
      kind, _, message = text.partition("\n")
      raise _error_class(kind)(message)


def main_first(fn: Callable[[], T], *, name: str) -> T:
  """`fn()` on process 0, then on the others once process 0 has finished.

  An error on any process stops every process: it re-raises its own, and the
  others raise the same moejax error class with the same one-line message (any
  other exception becomes a MoejaxError naming it), so no process waits in a
  collective for one that has stopped.
  """
  if jax.process_count() == 1:
    return fn()
  result, error, status = _attempt(fn, name) if is_writer() else (None, None, "")
  _agree(error, status)
  if not is_writer():
    result, error, status = _attempt(fn, name)
  _agree(error, status)
  return result


def all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (an all-gather of one flag each; no
  collective in a single-process run). Every process must call it."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(ok)))))


def fetch(tree: Any) -> Any:
  """Numpy values of a pytree of (possibly global) arrays, on every process.

  Every process must call it with the same tree: gathering an array that spans
  other processes' devices is a collective.
  """
  def one(x):
    if (isinstance(x, jax.Array) and not x.is_fully_addressable
        and not x.is_fully_replicated):
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def place(tree: Any, shardings: Any) -> Any:
  """`tree` laid out with `shardings` (a tree of the same structure).

  Leaves are global arrays (resharded) or values every process holds whole:
  numpy, or arrays on this process's devices, which go through the host because
  a committed local array cannot be sent to other processes' devices.
  """
  def one(x, sharding):
    if (jax.process_count() > 1 and not (isinstance(x, jax.Array)
                                         and not x.is_fully_addressable)):
      x = np.asarray(x)
    return jax.device_put(x, sharding)
  return jax.tree.map(one, tree, shardings)


def check_mesh_processes(devices: Sequence[Any], *, data: int, expert: int,
                         num_processes: int | None = None,
                         total_devices: int | None = None) -> None:
  """ConfigError unless every process owns at least one of the mesh's `devices`.

  A process without devices in the mesh would feed no rows and wait in every
  collective while the others train on part of the batch.
  """
  num_processes = jax.process_count() if num_processes is None else num_processes
  owners = {d.process_index for d in devices}
  missing = sorted(set(range(num_processes)) - owners)
  if not missing:
    return
  total = jax.device_count() if total_devices is None else total_devices
  raise ConfigError(
      f"mesh.data={data} x mesh.expert={expert} uses {len(devices)} of {total} "
      f"devices, so process{'es' if len(missing) > 1 else ''} "
      f"{', '.join(map(str, missing))} of {num_processes} "
      f"({total // num_processes} devices each) would own none; every process "
      f"must own devices in the mesh: make mesh.data x mesh.expert = {total} "
      "(or set one of them to -1)")
