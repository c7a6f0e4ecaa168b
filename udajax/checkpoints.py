"""Saving and loading model variables and train states with orbax.

`save_variables` / `load_variables` handle a bare `{"params", "batch_stats"}` pytree, the format
written by `data_prep/convert_torch_checkpoint.py` and named by `config.init_checkpoint`.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or does not fit the model."""


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
