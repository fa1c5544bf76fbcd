"""The errors moejax raises for bad input: one line that names the problem and the fix."""


class MoejaxError(Exception):
  """Base class: the CLI prints these as a single `moejax: error: ...` line."""


class ConfigError(MoejaxError, ValueError):
  """An invalid configuration value (unknown name, non-positive size, ...)."""


class DataError(MoejaxError, ValueError):
  """A data source that cannot be used (missing, empty, binary, too small)."""


class CheckpointError(MoejaxError):
  """A workdir whose checkpoints or files do not match the run."""


class TrainingDiverged(MoejaxError, FloatingPointError):
  """A non-finite loss; nothing from the diverged step is saved."""
