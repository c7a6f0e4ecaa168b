"""Checkpoints with orbax: the work directory's train states, and init checkpoints.

Two kinds of checkpoint:
* a **work directory** (`workdir/checkpoints/<step>/`): full train states written by the trainer
  through `checkpoint_manager` (the latest `train.keep_checkpoints` plus the best by eval score);
  `restore_state` resumes from one, `load_workdir_variables` reads its model variables;
* a **variables checkpoint**: a bare `{"params", "batch_stats"}` pytree written by
  `save_variables` (e.g. by `data_prep/convert_torch_checkpoint.py`) and read by `load_variables`.

`config.init_checkpoint` may name either; `initial_variables` overlays it on a fresh model init
(`merge_init_variables` reports every key or shape that does not fit).
"""

import os
import time
from typing import List

from absl import logging
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from udajax import errors
from udajax import multihost
from udajax import train_step as ts
from udajax.errors import CheckpointError

# Key under which each eval's selection score is stored with its checkpoint.
BEST_METRIC = "score"
# Top-level params key of the ASPP head (`models.DeepLabV2`): absent from ImageNet inits.
HEAD = "classifier"

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


# ----------------------------------------------------------------------------- work directories


def checkpoint_manager(workdir: str, keep: int = 3, *,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints`: keeps the latest `keep` steps plus the best one.

  `best_fn` makes orbax store each checkpoint's metrics (`{BEST_METRIC: score}`) on disk and
  answer `best_step()`; the BestN preservation keeps that step through restarts. Unless
  `read_only`, unfinished step directories are quarantined first (all processes must call it).
  """
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not read_only:
    if jax.process_index() == 0:
      quarantine_incomplete_steps(directory)
    multihost.barrier("checkpoints_checked")
  options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                         best_fn=lambda m: m[BEST_METRIC], best_mode="max",
                                         read_only=read_only,
                                         create=not read_only,
                                         cleanup_tmp_directories=not read_only)
  # The item handler named up front: without it a manager that has not saved yet (every
  # resumed run) answers `item_metadata` with None.
  return ocp.CheckpointManager(directory, options=options,
                              item_handlers=ocp.StandardCheckpointHandler())


def complete_steps(manager: ocp.CheckpointManager) -> List[int]:
  """The manager's steps whose directories are finished (see COMMIT_MARKER)."""
  return [s for s in manager.all_steps()
          if is_complete_step_dir(os.path.join(str(manager.directory), str(s)))]


def state_tree(state: ts.TrainState) -> dict:
  """The saved part of a TrainState (everything but the functions).

  "method_state" (e.g. the adversarial discriminator) only when the method has one, so that
  checkpoints of methods without it keep the layout they had before it existed.
  """
  tree = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
          "step": state.step, "centroid_state": state.centroid_state, "rng": state.rng}
  if state.method_state is not None:
    tree["method_state"] = state.method_state
  return tree


def save_state(manager: ocp.CheckpointManager, step: int, state: ts.TrainState, *,
               score=None, force: bool = False) -> None:
  """Saves a host (unreplicated) TrainState at `step`, with its eval score if any."""
  manager.save(step, args=ocp.args.StandardSave(state_tree(state)),
               metrics=None if score is None else {BEST_METRIC: score}, force=force)


def optimizer_of(opt_state) -> str:
  """"reference_sgd" or "sgd" (the config value that builds an optimiser state of this layout)."""
  keys = opt_state.keys() if isinstance(opt_state, dict) else getattr(opt_state, "_fields", ())
  if "inner_states" in keys:
    return "sgd"  # optax.multi_transform: the textbook SGD per lr group
  if "trace" in keys and "count" in keys:
    return "reference_sgd"
  return ""


def _saved_tree(manager: ocp.CheckpointManager, step: int):
  """Checkpoint `step`'s tree of saved array metadata (paths, shapes), or None if it cannot be
  read (a damaged step: the restore then names the error)."""
  try:
    return manager.item_metadata(step).tree
  except Exception:  # noqa: BLE001
    return None


def restore_state(manager: ocp.CheckpointManager, step: int, state: ts.TrainState):
  """Restores checkpoint `step` into `state`'s structure (CheckpointError if it does not fit).

  `state` may be abstract (`jax.eval_shape`): only its shapes and dtypes are used.
  """
  target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_tree(state))
  where = f"cannot resume from checkpoint step {step} in {manager.directory}"
  saved_tree = _saved_tree(manager, step)  # read once, for both checks below
  saved = optimizer_of(saved_tree.get("opt_state")) if isinstance(saved_tree, dict) else ""
  wanted = optimizer_of(state.opt_state)
  if saved and wanted and saved != wanted:
    raise CheckpointError(
        f"{where}: it was written with --config.train.optimizer={saved} and this run uses "
        f"{wanted}; pass --config.train.optimizer={saved} to continue that run, or use a new "
        "--workdir")
  changed = ("If the config changed (model, num_classes, train.mode, train.optimizer, "
             "loss.centroid_smoothing, adaptation.method), use a new --workdir")
  # Checked on the saved metadata first: a restore that fails part-way leaves orbax's other
  # array reads abandoned (a screen of "Exception ignored" tracebacks) for the same answer.
  mismatch = _layout_mismatch(saved_tree, target) if saved_tree is not None else ""
  if mismatch:
    raise CheckpointError(f"{where}: it does not fit this run's train state ({mismatch}). "
                          f"{changed}")
  try:
    tree = manager.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # orbax raises many types for a damaged or mismatching checkpoint.
    raise CheckpointError(
        f"{where}: {type(e).__name__}: {_one_line(e)}. {changed}; if the step is damaged, "
        "delete it to resume from an earlier one") from e
  return state.replace(**tree)


def _layout_mismatch(saved_tree, target) -> str:
  """How the saved arrays differ from `target`'s (paths, shapes), or "".

  Dtypes are not compared (a restore casts them).
  """
  saved, wanted = _shapes(saved_tree), _shapes(target)
  parts = []
  for label, keys in (("only in the checkpoint", sorted(saved.keys() - wanted.keys())),
                      ("only in this run", sorted(wanted.keys() - saved.keys()))):
    if keys:
      parts.append(f"{len(keys)} arrays {label}, e.g. {', '.join(keys[:3])}")
  shapes = [k for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  if shapes:
    parts.append(f"{len(shapes)} arrays of another shape, e.g. "
                 + ", ".join(f"{k} saved {saved[k]} vs {wanted[k]}" for k in shapes[:3]))
  return "; ".join(parts)


def _shapes(tree) -> dict:
  """{"params/a/b": shape} of a tree of arrays, shape structs or orbax array metadata."""
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path):
          tuple(getattr(leaf, "shape", ()) or ())
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def workdir_step(path: str, which: str = "latest") -> int:
  """The step of a work directory's `which` ("latest" or "best") complete checkpoint.

  "best" is the best by eval score, or the latest when no checkpoint has a score.
  """
  manager = checkpoint_manager(path, read_only=True)
  complete = complete_steps(manager)
  step = manager.best_step() if which == "best" else None
  if step not in complete:
    step = complete[-1] if complete else None
  if step is None:
    raise CheckpointError(
        f"work directory {path} has no complete checkpoint yet: train in it first, or set "
        "config.init_checkpoint to another workdir or converted checkpoint")
  return step


def load_workdir_variables(path: str, which: str = "latest"):
  """params and batch_stats of a work directory's `which` checkpoint, as numpy.

  which="latest": the last complete step (what `init_checkpoint=<workdir>` uses: the reference
  adapts from its final source-only model). which="best": the best by eval score (evaluation),
  falling back to the latest when no checkpoint has a score.
  """
  step = workdir_step(path, which)
  manager = checkpoint_manager(path, read_only=True)
  try:
    tree = manager.restore(step, args=ocp.args.StandardRestore())
  except Exception as e:  # orbax raises many types for a damaged directory.
    raise CheckpointError(
        f"cannot read checkpoint step {step} of work directory {path}: {type(e).__name__}: "
        f"{_one_line(e)}; delete that step directory to use an earlier one") from e
  return {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}


# ----------------------------------------------------------------------------- variables


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
  path = errors.require_checkpoint_dir(path, "init checkpoint")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.restore(path)
  except Exception as e:  # orbax raises many types for a damaged directory.
    raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
  return jax.tree_util.tree_map(np.asarray, tree)


def load_init_tree(path: str, which: str = "latest") -> dict:
  """Variables of `path`: a udajax work directory (its `which` checkpoint) or a converted one."""
  path = errors.require_checkpoint_dir(path, "init checkpoint")  # a URL, file or missing path
  return load_workdir_variables(path, which) if is_workdir(path) else load_variables(path)


def merge_init_variables(fresh: dict, loaded: dict, source: str) -> dict:
  """Overlays loaded variables on a fresh init; the classifier head may be absent (kept fresh).

  Raises CheckpointError listing every unexpected key, missing key and shape mismatch: the usual
  causes are a checkpoint for another backbone/depth or another number of classes.
  """
  fresh = flax.core.unfreeze(fresh)
  problems = []
  merged = {}
  for collection in ("params", "batch_stats"):
    f = flax.traverse_util.flatten_dict(fresh.get(collection, {}))
    got = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded.get(collection, {}) or {}))
    head_missing = not any(k[0] == HEAD for k in got)
    for key in sorted(set(got) - set(f)):
      problems.append(f"unexpected {collection}/{'/'.join(key)}")
    for key, value in f.items():
      if key not in got:
        if key[0] == HEAD and head_missing:
          continue
        problems.append(f"missing {collection}/{'/'.join(key)}")
      elif tuple(np.shape(got[key])) != tuple(np.shape(value)):
        problems.append(f"shape of {collection}/{'/'.join(key)}: checkpoint {np.shape(got[key])} "
                        f"vs model {np.shape(value)}")
    flat = {k: (np.asarray(got[k]) if k in got else value) for k, value in f.items()}
    merged[collection] = flax.traverse_util.unflatten_dict(flat)
  if problems:
    shown = "; ".join(problems[:20]) + (
        f"; ... ({len(problems)} in all)" if len(problems) > 20 else "")
    raise CheckpointError(
        f"init checkpoint {source} does not fit the configured model (check config.num_classes and "
        f"config.model.backbone/stage_blocks/base_width): {shown}")
  return merged


def initial_variables(config, rng, *, require_classifier: bool = False,
                      which: str = "latest") -> dict:
  """Fresh variables overlaid with `config.init_checkpoint` (if set; from a work directory its
  `which` = "latest" or "best" checkpoint).

  A checkpoint without a classifier (an ImageNet init) gets a fresh ASPP head, as the reference
  does; with `require_classifier` (evaluation, prediction) that is an error instead.
  """
  path = config.init_checkpoint
  if not path:
    return ts.init_variables(config, rng)
  loaded = load_init_tree(path, which)  # before the init: a bad path fails fast
  merged = merge_init_variables(ts.init_variables(config, rng), loaded, path)
  if HEAD not in (loaded.get("params") or {}):
    if require_classifier:
      raise CheckpointError(
          f"checkpoint {path} has no classifier head: it is a backbone initialisation (e.g. "
          "ImageNet), not a trained segmentation model")
    logging.info("init checkpoint %s has no classifier: the ASPP head is initialised fresh", path)
  return merged


def _one_line(e, limit=300) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit] + " ..."
