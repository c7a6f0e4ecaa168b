"""`train_and_evaluate(config, workdir)`: the training loop (data, pmap steps, logs, checkpoints).

Work directory layout:

    workdir/config.json            the resolved config of the run
    workdir/checkpoints/<step>/    orbax checkpoints (latest `train.keep_checkpoints` + the best
                                   by target mIoU); a restarted job resumes from the latest
    workdir/events.out.tfevents.*  clu metric logs (TensorBoard), written by process 0 only
    workdir/source_only/           the source-only stage when `train.warmup_source_only_steps` > 0

Resilience (see docs/RESILIENCE.md): a restarted job resumes exactly (same data order,
augmentation, RNG and centroid state); SIGTERM (preemption) finishes the current step, saves a
checkpoint and raises `Preempted` (multi-host: orbax's preemption sync point); unfinished
checkpoint directories are ignored; a NaN/Inf loss stops with `TrainingDiverged` or is skipped.
"""

import copy
import functools
import json
import os
import signal
import threading
import time
import warnings
from typing import Dict, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from clu import metric_writers
from clu import periodic_actions

from udajax import checkpoints as ckpt_lib
from udajax import configuration
from udajax import input_pipeline
from udajax import labels as labels_lib
from udajax import metrics as metrics_lib
from udajax import train_step as ts
from udajax import visualization

# Key under which each eval's selection score is stored with its checkpoint.
BEST_METRIC = "score"


def selection_metric(num_classes: int) -> str:
  """The eval metric that picks the best checkpoint: mIoU, or mIoU13 for 16-class (SYNTHIA) runs,
  as the reference selects and the paper reports."""
  return "mIoU13" if num_classes == 16 else "mIoU"


class TrainingDiverged(RuntimeError):
  """A loss term became NaN/Inf and `train.on_nan` is "stop"."""


class Preempted(Exception):
  """Training stopped early on SIGTERM (or a multi-host preemption notice) after saving a
  checkpoint at `step`; restarting the same command resumes from it."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: stopped at step {step} after saving a checkpoint in {directory}; "
                     "run the same command again to resume")
    self.step = step
    self.directory = directory


class _PreemptionNotice:
  """Turns SIGTERM into a flag that the training loop polls after every step.

  Single process: a Python signal handler (installed from the main thread only). With
  `jax.distributed` initialised, JAX's preemption sync manager already listens for SIGTERM and
  agrees a common step with every process (`CheckpointManager.reached_preemption`), so no
  handler is installed: replacing JAX's would break that agreement.
  """

  def __init__(self):
    self.signum = None
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
    """True when training should save and stop after `step` (call at every step, all processes)."""
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self.signum is not None


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config, *, read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the latest `keep_checkpoints` checkpoints plus the best one by target mIoU.

  `best_fn` makes orbax store each checkpoint's metrics on disk and answer `best_step()`; the
  BestN preservation keeps that step through restarts.
  """
  from orbax.checkpoint import checkpoint_managers as cm
  keep = config.train.keep_checkpoints if config is not None else 3
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=keep),
      cm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
               keep_checkpoints_without_metrics=False),
  ])
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not read_only:
    if jax.process_index() == 0:
      ckpt_lib.quarantine_incomplete_steps(directory)
    _sync("checkpoints_checked")
  options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                         best_fn=lambda m: m[BEST_METRIC], best_mode="max",
                                         read_only=read_only,
                                         create=not read_only,
                                         cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(directory, options=options)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _complete_steps(manager) -> list:
  """The manager's steps whose directories are finished (see checkpoints.COMMIT_MARKER)."""
  return [s for s in manager.all_steps()
          if ckpt_lib.is_complete_step_dir(os.path.join(str(manager.directory), str(s)))]


def _state_tree(state: ts.TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
          "step": state.step, "centroid_state": state.centroid_state, "rng": state.rng}


def _restore_state(manager, step, state: ts.TrainState) -> ts.TrainState:
  """Restores checkpoint `step` into `state`'s structure (CheckpointError if it does not fit)."""
  target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
  try:
    tree = manager.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # orbax raises many types for a damaged or mismatching checkpoint.
    raise ckpt_lib.CheckpointError(
        f"cannot resume from checkpoint step {step} in {manager.directory}: {type(e).__name__}: "
        f"{_one_line(e)}. If the config changed (model, num_classes, train.mode, "
        "loss.centroid_smoothing), use a new --workdir; if the step is damaged, delete it to "
        "resume from an earlier one") from e
  return state.replace(**tree)


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_workdir_variables(path: str, which: str = "latest") -> dict:
  """params and batch_stats of a udajax workdir's checkpoint, as numpy.

  which="latest": the last complete step (what `init_checkpoint=<workdir>` uses: the reference
  adapts from its final source-only model). which="best": the best by eval score (evaluation),
  falling back to the latest when no checkpoint has a score.
  """
  manager = checkpoint_manager(path, None, read_only=True)
  complete = _complete_steps(manager)
  step = manager.best_step() if which == "best" else None
  if step not in complete:
    step = complete[-1] if complete else None
  if step is None:
    raise ckpt_lib.CheckpointError(
        f"work directory {path} has no complete checkpoint yet: train in it first, or set "
        "config.init_checkpoint to another workdir or converted checkpoint")
  try:
    tree = manager.restore(step, args=ocp.args.StandardRestore())
  except Exception as e:  # orbax raises many types for a damaged directory.
    raise ckpt_lib.CheckpointError(
        f"cannot read checkpoint step {step} of work directory {path}: {type(e).__name__}: "
        f"{_one_line(e)}; delete that step directory to use an earlier one") from e
  return {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}


def _one_line(e, limit=300) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit] + " ..."


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
    l = flax.traverse_util.flatten_dict(flax.core.unfreeze(loaded.get(collection, {}) or {}))
    head_missing = not any(k[0] == "classifier" for k in l)
    for key in sorted(set(l) - set(f)):
      problems.append(f"unexpected {collection}/{'/'.join(key)}")
    for key, value in f.items():
      if key not in l:
        if key[0] == "classifier" and head_missing:
          continue
        problems.append(f"missing {collection}/{'/'.join(key)}")
      elif tuple(np.shape(l[key])) != tuple(np.shape(value)):
        problems.append(f"shape of {collection}/{'/'.join(key)}: checkpoint {np.shape(l[key])} "
                        f"vs model {np.shape(value)}")
    flat = {k: (np.asarray(l[k]) if k in l else value) for k, value in f.items()}
    merged[collection] = flax.traverse_util.unflatten_dict(flat)
  if problems:
    shown = "; ".join(problems[:20]) + (f"; ... ({len(problems)} in all)" if len(problems) > 20 else "")
    raise ckpt_lib.CheckpointError(
        f"init checkpoint {source} does not fit the configured model (check config.num_classes and "
        f"config.model.backbone/stage_blocks/base_width): {shown}")
  return merged


def load_init_tree(path: str, which: str = "latest") -> dict:
  """Variables of `path`: a udajax workdir (its `which` checkpoint) or a converted one."""
  path = os.path.abspath(os.path.expanduser(path))
  return load_workdir_variables(path, which) if is_workdir(path) else ckpt_lib.load_variables(path)


def initial_variables(config, rng, *, require_classifier: bool = False,
                      which: str = "latest") -> dict:
  """Fresh variables overlaid with `config.init_checkpoint` (if set; from a workdir its
  `which` = "latest" or "best" checkpoint).

  A checkpoint without a classifier (an ImageNet init) gets a fresh ASPP head, as the reference
  does; with `require_classifier` (evaluation) that is an error instead.
  """
  path = config.init_checkpoint
  if not path:
    return ts.init_variables(config, rng)
  loaded = load_init_tree(path, which)  # before the init: a bad path fails fast
  fresh = ts.init_variables(config, rng)
  merged = merge_init_variables(fresh, loaded, path)
  if "classifier" not in (loaded.get("params") or {}):
    if require_classifier:
      raise ckpt_lib.CheckpointError(
          f"checkpoint {path} has no classifier head: it is a backbone initialisation (e.g. "
          "ImageNet), not a trained segmentation model")
    logging.info("init checkpoint %s has no classifier: the ASPP head is initialised fresh", path)
  return merged


def prepare_datasets(config) -> None:
  """Builds the demo dataset on first use (it needs no download); real datasets must be built
  by the user (the input pipeline's error names the command)."""
  names = {config.source.name, config.eval.name}
  if config.train.mode == "uda":
    names.add(config.target.name)
  if "udajax_demo" in names and jax.process_index() == 0:
    from udajax import datasets
    datasets.ensure_demo_built(config.data_dir)
  _sync("datasets_ready")
  check_train_sizes(config)


def check_train_sizes(config) -> None:
  """Rejects a training crop larger than the stored images (an upscale is a config mistake).

  The pipeline resizes the stored images to `image_size` on the fly; downscaling is fine (and
  evaluation may use any size), but enlarging training images only blurs them and costs time,
  so it is almost always a wrong key or builder config. Also fails early when a training
  dataset is not built (DatasetNotBuiltError naming the build command).
  """
  from udajax import datasets
  domains = ["source"] + (["target"] if config.train.mode == "uda" else [])
  for domain in domains:
    d = config[domain]
    builder = datasets.load_builder(d.name, d.builder_config, config.data_dir)
    stored = tuple(builder.info.features["image"].shape[:2])
    if None in stored:
      continue  # original-size config: sizes vary per example
    h, w = tuple(d.image_size)
    if h > stored[0] or w > stored[1]:
      raise configuration.ConfigError(
          f"config key '{domain}.image_size' = {(h, w)} is larger than the stored images of "
          f"{d.name}/{d.builder_config} ({stored[0]}x{stored[1]}, HxW): training images would be "
          f"upscaled. Set {domain}.image_size to at most {stored}, or build and use a larger "
          f"builder config ({domain}.builder_config, e.g. 'full')")


# ----------------------------------------------------------------------------- data


def _local_devices():
  return jax.local_device_count()


def train_batches(config, start_step: int):
  """Infinite iterator of per-device train batches for the configured mode."""
  t = config.train
  common = dict(data_dir=config.data_dir, batch_size_per_device=t.batch_size_per_device,
                num_local_devices=_local_devices(), num_classes=config.num_classes,
                start_step=start_step, augment=t.augment)
  src = input_pipeline.train_iterator(
      config.source.name, builder_config=config.source.builder_config, split=config.source.split,
      image_size=tuple(config.source.image_size), seed=config.seed, **common)
  tgt = None
  if t.mode == "uda":
    tgt = input_pipeline.train_iterator(
        config.target.name, builder_config=config.target.builder_config,
        split=config.target.split, image_size=tuple(config.target.image_size),
        seed=config.seed + 1, with_labels=False, **common)
  while True:
    s = next(src)
    batch = {"source_image": s["image"], "source_label": s["label"]}
    if tgt is not None:
      batch["target_image"] = next(tgt)["image"]
    yield batch


def eval_batches(config):
  """Eval batches; every process yields the same number of batches (extra ones fully masked)."""
  e = config.eval
  n_dev = _local_devices()
  label_size = tuple(e.label_size) or None
  kwargs = dict(builder_config=e.builder_config, split=e.split, data_dir=config.data_dir,
                image_size=tuple(e.image_size), label_size=label_size,
                batch_size_per_device=e.batch_size_per_device, num_local_devices=n_dev,
                num_classes=config.num_classes)
  total = input_pipeline.num_examples(e.name, e.builder_config, e.split, config.data_dir)
  per_process = -(-total // jax.process_count())
  num_batches = -(-per_process // (n_dev * e.batch_size_per_device))
  it = input_pipeline.eval_iterator(e.name, **kwargs)
  last = None
  for _ in range(num_batches):
    batch = next(it, None)
    if batch is None:
      batch = {k: v for k, v in last.items() if k in ("image", "label", "mask")}
      batch["mask"] = np.zeros_like(batch["mask"])
    last = batch
    yield {k: batch[k] for k in ("image", "label", "mask")}


# ----------------------------------------------------------------------------- evaluation


def class_subsets(num_classes: int) -> Dict[str, tuple]:
  return {"13": labels_lib.SYNTHIA13_OF_16} if num_classes == 16 else {}


def evaluate(config, p_eval_step, params, batch_stats, *, num_images: int = 0):
  """Runs the eval set; returns (summary dict, image panels or None)."""
  cm = None
  panels = None
  for batch in eval_batches(config):
    batch_cm, pred = p_eval_step(params, batch_stats, batch)
    # Each batch's matrix is counted on device (int32, summed over devices); the running total
    # is int64 on the host: full-resolution sets exceed 2^31 pixels of one class.
    batch_cm = np.asarray(jax.device_get(batch_cm[0]), np.int64)
    cm = batch_cm if cm is None else cm + batch_cm
    if panels is None and num_images > 0:
      take = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])[:num_images]
      panels = visualization.summary_panels(take(batch["image"]), take(batch["label"]),
                                            take(pred), config.num_classes)
  if cm is None:
    raise ValueError(f"eval split {config.eval.name}/{config.eval.builder_config}:{config.eval.split} is empty")
  summary = metrics_lib.summarize(cm,
                                  labels_lib.class_names(config.num_classes),
                                  class_subsets(config.num_classes))
  return summary, panels


# ----------------------------------------------------------------------------- training


def _write_config(config, workdir):
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def _maybe_warmup_stage(config, workdir) -> Optional[dict]:
  """Runs the source-only stage first when `train.warmup_source_only_steps` > 0."""
  steps = config.train.warmup_source_only_steps
  if config.train.mode != "uda" or steps <= 0:
    return None
  sub = copy.deepcopy(config)
  with sub.unlocked():
    sub.train.mode = "source_only"
    sub.train.num_steps = steps
    sub.train.stop_step = 0
    sub.train.warmup_source_only_steps = 0
  src_dir = os.path.join(workdir, "source_only")
  logging.info("Stage 1/2: source-only training for %d steps in %s", steps, src_dir)
  result = train_and_evaluate(sub, src_dir)
  with config.unlocked():
    config.init_checkpoint = src_dir
  logging.info("Stage 2/2: adaptation from the source-only model")
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (and periodically evaluates) as configured; returns the final eval summary.

  Resumes from the latest checkpoint in `workdir` when there is one.
  """
  configuration.validate_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  prepare_datasets(config)
  warmup_result = _maybe_warmup_stage(config, workdir)
  _write_config(config, workdir)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)

  t = config.train
  last_step = t.stop_step or t.num_steps
  manager = checkpoint_manager(workdir, config)
  latest = manager.latest_step()
  if latest is not None:
    # Shapes only (no initialisation is run): the restore overwrites every value.
    state = jax.eval_shape(
        lambda: ts.create_train_state(config, ts.init_variables(config, init_rng), state_rng))
    state = _restore_state(manager, latest, state)
    logging.info("Resumed from %s at step %d", workdir, int(state.step))
  else:
    state = ts.create_train_state(config, initial_variables(config, init_rng), state_rng)
  start_step = int(state.step)

  if latest is None and jax.process_index() == 0:
    writer.write_hparams(_flat_config(config))

  p_train_step = ts.make_p_train_step(config)
  p_eval_step = ts.make_p_eval_step(config)
  rstate = flax.jax_utils.replicate(state)
  del state

  report = periodic_actions.ReportProgress(num_train_steps=last_step, writer=writer,
                                           every_steps=t.log_every_steps)
  summary = None
  train_metrics = []
  batches = flax.jax_utils.prefetch_to_device(train_batches(config, start_step), 2)
  logging.info("Training %s from step %d to %d on %d devices (%d processes)", t.mode, start_step,
               last_step, jax.device_count(), jax.process_count())

  step = start_step
  preempted = False
  with _PreemptionNotice() as notice:
    while step < last_step:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(batches)
        rstate, m = p_train_step(rstate, batch)
      step += 1
      m = jax.device_get(jax.tree_util.tree_map(lambda x: x[0], m))
      if m["finite"] < 1:
        bad = sorted(k for k, v in m.items() if not np.isfinite(v))
        what = ", ".join(f"{k}={m[k]}" for k in bad) if bad else "a gradient (losses finite)"
        msg = f"training diverged: non-finite loss at step {step}: {what}"
        if t.on_nan == "stop":
          manager.wait_until_finished()
          writer.flush()
          good = manager.latest_step()
          where = (f"the last good checkpoint is step {good} in {manager.directory}"
                   if good is not None else "no checkpoint was written yet")
          raise TrainingDiverged(f"{msg}; {where}. Lower train.lr, or set train.on_nan='skip' "
                                 "to skip such updates")
        logging.warning("%s; update skipped", msg)
      train_metrics.append(m)
      report(step)

      if step % t.log_every_steps == 0 or step == last_step:
        keys = train_metrics[-1].keys()
        with warnings.catch_warnings():  # all-NaN window (skipped steps): the mean is NaN
          warnings.simplefilter("ignore", RuntimeWarning)
          mean = {f"train/{k}": float(np.nanmean([x[k] for x in train_metrics])) for k in keys
                  if k != "finite"}
        mean["train/skipped_steps"] = float(sum(1 - x["finite"] for x in train_metrics))
        writer.write_scalars(step, mean)
        train_metrics = []

      do_eval = step % config.eval.every_steps == 0 or step == last_step
      eval_metrics = None
      if do_eval:
        with report.timed("eval"):
          summary, panels = evaluate(config, p_eval_step, rstate.params, rstate.batch_stats,
                                     num_images=config.eval.num_images_to_log)
        eval_metrics = {k: v for k, v in summary.items()}
        writer.write_scalars(step, {f"eval/{k}": v for k, v in summary.items() if np.isfinite(v)})
        if panels is not None:
          writer.write_images(step, {"eval/input_label_prediction": panels})
        logging.info("step %d eval:\n%s", step, metrics_lib.format_table(
            {f"step {step}": summary}, labels_lib.class_names(config.num_classes)))
      if do_eval or step % t.checkpoint_every_steps == 0:
        state = jax.device_get(ts.unreplicate(rstate))
        manager.save(step, args=ocp.args.StandardSave(_state_tree(state)),
                     metrics=({BEST_METRIC: eval_metrics[selection_metric(config.num_classes)]}
                              if eval_metrics else None))
      if step < last_step and notice.reached(manager, step):
        if manager.latest_step() != step:
          state = jax.device_get(ts.unreplicate(rstate))
          manager.save(step, args=ocp.args.StandardSave(_state_tree(state)), force=True)
        preempted = True
        break
  manager.wait_until_finished()
  writer.flush()
  if preempted:
    logging.warning("Preempted: checkpoint saved at step %d in %s", step, manager.directory)
    raise Preempted(step, str(manager.directory))

  if summary is None:  # resumed at the end: evaluate the final state once more
    summary, _ = evaluate(config, p_eval_step, rstate.params, rstate.batch_stats)
  names = labels_lib.class_names(config.num_classes)
  if warmup_result is not None:
    table = metrics_lib.format_table({"source only": warmup_result, "adapted": summary}, names)
  else:
    table = metrics_lib.format_table({t.mode: summary}, names)
  print(f"\nTarget evaluation ({config.eval.name}/{config.eval.builder_config}:{config.eval.split}) "
        f"after {last_step} steps, workdir {workdir}:\n{table}\n", flush=True)
  result = dict(summary)
  if warmup_result is not None:
    result["source_only"] = warmup_result
  return result


def _flat_config(config, prefix=""):
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat_config(v, prefix + k + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[prefix + k] = v
    elif v is None:
      out[prefix + k] = "None"
    else:
      out[prefix + k] = str(v)
  return out
