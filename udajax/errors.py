"""Errors caused by the user's input (config, data, checkpoints): reported as one clear line."""

from udajax.checkpoints import CheckpointError
from udajax.configuration import ConfigError


def _user_errors():
  errs = [ConfigError, CheckpointError]
  try:
    from udajax.input_pipeline import DatasetNotBuiltError
    errs.append(DatasetNotBuiltError)
  except ImportError:
    pass
  try:
    from udajax.trainer import TrainingDiverged
    errs.append(TrainingDiverged)
  except ImportError:
    pass
  return tuple(errs)


USER_ERRORS = _user_errors()
