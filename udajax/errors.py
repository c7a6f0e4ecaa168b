"""Error types shared by the library and its command-line tools (imports nothing of udajax).

Every mistake a user can fix (a config key, a dataset that is not built, a checkpoint that is
missing or does not fit) raises a subclass of `UserError`; the CLIs print it as one
`error: ...` line and exit with status 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Base class of the errors caused by the user's input; its message says what to do."""


class ConfigError(UserError, ValueError):
  """A config key is unknown or has an impossible value."""


class CheckpointError(UserError, ValueError):
  """A checkpoint is missing, unreadable or does not fit the model."""


class DatasetNotBuiltError(UserError, FileNotFoundError):
  """The requested dataset/config has not been built under the data directory."""


class CorruptFileError(UserError, OSError):
  """A source file that cannot be decoded (truncated, not a PNG, wrong layout). Names the path."""


class TrainingDiverged(RuntimeError):
  """A loss term or gradient became NaN/Inf and `train.on_nan` is "stop".

  Not a `UserError`: the trainer raises it after the last good checkpoint is committed, and
  `train.py` reports it in one line (exit status 2) without tearing down the input pipeline.
  """


def reject_remote_path(path: str, what: str, error=UserError) -> None:
  """Raises `error` for a URL such as gs://bucket/run: udajax reads and writes work directories and
  checkpoints through local file-system paths (`os.path`), where a URL would silently become a
  local folder named "gs:". A bucket mounted as a file system (gcsfuse) works."""
  if "://" in str(path):
    raise error(f"{what} {path}: remote (URL) paths are not supported; mount the bucket as a file "
                "system (e.g. with gcsfuse) or use a shared file system, and give its local path")


def require_checkpoint_dir(path: str, what: str = "checkpoint") -> str:
  """`path` (user-expanded, absolute) if it is a directory; else CheckpointError naming it and
  how to make one. Only `os`: the command-line tools call it before importing jax or TensorFlow,
  so a mistyped --checkpoint fails within a second.

  A directory is either a udajax work directory or one written by
  data_prep/convert_torch_checkpoint.py; reading it checks the rest.
  """
  import os
  if not path:
    raise CheckpointError(f"no {what} given: name a udajax work directory or a converted "
                          "checkpoint directory")
  reject_remote_path(path, what, CheckpointError)
  path = os.path.abspath(os.path.expanduser(path))
  tool = "python data_prep/convert_torch_checkpoint.py"
  if os.path.isfile(path):
    raise CheckpointError(
        f"{what} {path} is a file, not a directory. Give a udajax work directory, or convert a "
        f"PyTorch checkpoint with: {tool} --input={path} --output=DIR [--backbone=resnet101|vgg16]")
  if not os.path.isdir(path):
    raise CheckpointError(
        f"{what} {path} does not exist. Give a udajax work directory, or convert a PyTorch "
        f"checkpoint with: {tool} --input=FILE.pth --output={path} [--backbone=resnet101|vgg16]")
  return path


# What the CLIs catch and print as one line (exit status 2).
USER_ERRORS = (UserError,)
