"""Saving and loading model variables and train states with orbax.

`save_variables` / `load_variables` handle a bare `{"params", "batch_stats"}` pytree, the format
written by `data_prep/convert_torch_checkpoint.py` and named by `config.init_checkpoint`.
"""

import os
import time
from typing import List

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or does not fit the model."""


# orbax 0.12.8 writes this file into a step directory as the last act of a save, before it
# renames `<step>.orbax-checkpoint-tmp-<n>` to `<step>` (local disks) or in place (GCS). A step
# directory without it was not finished (e.g. copied half-way, or a save killed on a file system
# without atomic rename); orbax's own step listing does *not* check it, so we do.
COMMIT_MARKER = "commit_success.txt"
INCOMPLETE_SUFFIX = ".incomplete"


def is_complete_step_dir(path: str) -> bool:
  """True when `path` is a finished orbax step directory (it has the commit marker)."""
  return os.path.isfile(os.path.join(path, COMMIT_MARKER))


def quarantine_incomplete_steps(directory: str) -> List[str]:
  """Renames unfinished step directories `<step>/` of `directory` to `<step>.incomplete-<time>`.

  orbax then ignores them (its temporary `*.orbax-checkpoint-tmp-*` directories it ignores and,
  with `cleanup_tmp_directories`, deletes itself), so a resume falls back to the latest complete
  checkpoint and a later save of the same step does not collide. Nothing is deleted. Returns the
  new paths. Call on one process only.
  """
  moved = []
  if not os.path.isdir(directory):
    return moved
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.isdigit() and os.path.isdir(path) and not is_complete_step_dir(path):
      new = f"{path}{INCOMPLETE_SUFFIX}-{int(time.time())}"
      os.rename(path, new)
      logging.warning("checkpoint step %s in %s is incomplete (no %s): ignored, moved to %s",
                      name, directory, COMMIT_MARKER, new)
      moved.append(new)
  return moved


def save_variables(path: str, variables) -> str:
  """Writes a pytree of arrays as an orbax checkpoint directory at `path` (must not exist)."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise CheckpointError(f"{path} already exists; remove it or choose another output path")
  variables = jax.tree_util.tree_map(np.asarray, variables)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(path, variables)
  return path


def load_variables(path: str):
  """Reads a pytree written by `save_variables` as numpy arrays.

  Raises CheckpointError naming the path (and how to make one) when it is missing or unreadable.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(
        f"init checkpoint {path} does not exist. Convert a PyTorch checkpoint with: "
        f"python data_prep/convert_torch_checkpoint.py --input=FILE.pth --output={path} "
        "[--backbone=resnet101|vgg16]")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.restore(path)
  except Exception as e:  # orbax raises many types for a damaged directory.
    raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
  return jax.tree_util.tree_map(np.asarray, tree)
