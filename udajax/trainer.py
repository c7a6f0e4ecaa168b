"""`train_and_evaluate(config, workdir)`: the training loop (pmap steps, logs, checkpoints).

Work directory layout:

    workdir/config.json            the resolved config of the run
    workdir/checkpoints/<step>/    orbax checkpoints (latest `train.keep_checkpoints` + the best
                                   by target mIoU); a restarted job resumes from the latest
    workdir/events.out.tfevents.*  clu metric logs (TensorBoard), written by process 0 only
    workdir/source_only/           the source-only stage when `train.warmup_source_only_steps` > 0

A restarted job resumes exactly (same data order, augmentation, RNG and centroid state). SIGTERM
finishes the current step, saves a checkpoint and raises `preemption.Preempted`; a NaN/Inf loss
raises `errors.TrainingDiverged` or skips the update (`train.on_nan`). See docs/RESILIENCE.md.

The host dispatches steps without waiting for them: each step's metrics go to an on-device log
window (`log_window`), fetched only at log, eval and checkpoint steps and on preemption, where a
non-finite step stops the run (naming that step) before anything is saved. The state is placed
with `train_step.replicate`, so the step compiles once per run (the count is logged).
"""

import collections
import copy
import itertools
import os

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import jax
import ml_collections
import numpy as np

from udajax import checkpoints
from udajax import compiles
from udajax import configuration
from udajax import data
from udajax import embeddings
from udajax import errors
from udajax import evaluation
from udajax import labels as labels_lib
from udajax import log_window
from udajax import metrics as metrics_lib
from udajax import train_step as ts
from udajax.errors import TrainingDiverged
from udajax.preemption import Preempted, PreemptionNotice


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains as configured (resuming from `workdir`); returns the final target eval summary.

  With `train.warmup_source_only_steps` > 0 (UDA), this is two runs on copies of `config`: a
  source-only stage in `workdir/source_only`, then the adaptation in `workdir` initialised from
  it; the result then also holds the first stage's summary under "source_only".
  """
  configuration.validate_config(config)
  errors.reject_remote_path(workdir, "work directory")
  workdir = os.path.abspath(workdir)
  if config.train.mode != "uda" or config.train.warmup_source_only_steps <= 0:
    return train(config, workdir)
  source_dir = os.path.join(workdir, "source_only")
  source_config, adapt_config = warmup_stage_configs(config, source_dir)
  logging.info("Stage 1/2: source-only training for %d steps in %s",
               source_config.train.num_steps, source_dir)
  source_summary = train(source_config, source_dir)
  logging.info("Stage 2/2: adaptation from the source-only model")
  return dict(train(adapt_config, workdir), source_only=source_summary)


def warmup_stage_configs(config, source_dir: str):
  """(source-only stage config, adaptation config initialised from `source_dir`): copies."""
  source = copy.deepcopy(config)
  with source.unlocked():
    source.train.mode = "source_only"
    source.train.num_steps = config.train.warmup_source_only_steps
    source.train.stop_step = 0
    source.train.warmup_source_only_steps = 0
  adapt = copy.deepcopy(config)
  with adapt.unlocked():
    adapt.init_checkpoint = source_dir
    adapt.train.warmup_source_only_steps = 0
  return source, adapt


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """One training run in `workdir` (no warm-up stage); returns the final eval summary."""
  t = config.train
  os.makedirs(workdir, exist_ok=True)
  data.prepare_datasets(config)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  manager = checkpoints.checkpoint_manager(workdir, t.keep_checkpoints)
  state = initial_state(config, manager)
  start_step, last_step = int(state.step), t.stop_step or t.num_steps
  if start_step == 0:
    writer.write_hparams(flat_hparams(config))

  p_train_step = log_window.make_p_train_step(config)
  p_eval_step = ts.make_p_eval_step(config)
  rstate = ts.replicate(state)
  del state
  batches = prefetch_to_device(data.train_batches(config, start_step), 2)
  report = periodic_actions.ReportProgress(num_train_steps=last_step, writer=writer,
                                           every_steps=t.log_every_steps)
  logging.info("Training %s from step %d to %d on %d devices (%d processes)", t.mode, start_step,
               last_step, jax.device_count(), jax.process_count())

  # The host dispatches steps ahead and fetches the on-device log window only where it logs,
  # evaluates or saves; a non-finite step found there stops the run before anything is saved.
  summary = None
  with PreemptionNotice() as notice, compiles.CompileCounter() as compiled:
    step_fn = compiled.wrap(p_train_step)
    window = ts.replicate(log_window.empty())
    try:
      for step in range(start_step + 1, last_step + 1):  # `step` = steps done after this one
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          rstate, step_metrics, window = step_fn(rstate, next(batches), window)
        report(step)

        log_now = step % t.log_every_steps == 0 or step == last_step
        eval_now = step % config.eval.every_steps == 0 or step == last_step
        save_now = eval_now or step % t.checkpoint_every_steps == 0
        if log_now or save_now:
          fetched = _checked_window(config, manager, writer, window, step_metrics)
        if log_now:
          _warn_skipped(fetched)
          scalars = {f"train/{k}": v for k, v in fetched.averages.items()}
          writer.write_scalars(step, dict(scalars, **{"train/skipped_steps": fetched.skipped}))
          window = ts.replicate(log_window.empty())

        score = None
        if eval_now:
          with report.timed("eval"):
            summary = evaluate_and_log(config, p_eval_step, rstate, writer, step)
          score = summary[evaluation.selection_metric(config.num_classes)]
        if save_now:
          checkpoints.save_state(manager, step, ts.unreplicate(rstate), score=score)

        if step < last_step and notice.reached(manager, step):
          if not log_now:
            _warn_skipped(_checked_window(config, manager, writer, window, step_metrics))
          if manager.latest_step() != step:
            checkpoints.save_state(manager, step, ts.unreplicate(rstate), force=True)
          manager.wait_until_finished()
          writer.flush()
          logging.warning("Preempted: checkpoint saved at step %d in %s", step, manager.directory)
          raise Preempted(step, str(manager.directory))
    finally:
      logging.info("train step compiled %d time(s) in this run", compiled.count)
  manager.wait_until_finished()
  writer.flush()
  if summary is None:  # resumed at the end: evaluate the final state once more
    summary, _ = evaluation.evaluate(config, p_eval_step, rstate.params, rstate.batch_stats)
  return summary


def prefetch_to_device(iterator, size: int, devices=None, axis_name: str = ts.AXIS):
  """Host batches (leading axis: local devices) placed on the devices `size` batches ahead.

  As `flax.jax_utils.prefetch_to_device`, with the sharding built once and one `device_put` per
  batch (flax builds a mesh and stacks a copy per array: twice the host time per step on CPU),
  on the train step's mesh axis `axis_name`, like the state (`train_step.replicate`).
  """
  sharding = ts.device_sharding(devices, axis_name)
  iterator = iter(iterator)
  queue = collections.deque(jax.device_put(b, sharding) for b in itertools.islice(iterator, size))
  while queue:
    yield queue.popleft()
    queue.extend(jax.device_put(b, sharding) for b in itertools.islice(iterator, 1))


def initial_state(config, manager) -> ts.TrainState:
  """The latest checkpoint of `manager`, or a new state from `config.init_checkpoint` / random."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  latest = manager.latest_step()
  if latest is None:
    variables = checkpoints.initial_variables(config, init_rng)
    return ts.create_train_state(config, variables, state_rng)
  # Shapes only (no initialisation is run): the restore overwrites every value.
  abstract = jax.eval_shape(
      lambda: ts.create_train_state(config, ts.init_variables(config, init_rng), state_rng))
  state = checkpoints.restore_state(manager, latest, abstract)
  workdir = os.path.dirname(str(manager.directory))
  logging.info("Resumed from %s at step %d", workdir, int(state.step))
  return state


def evaluate_and_log(config, p_eval_step, rstate, writer, step: int) -> dict:
  """Evaluates the replicated state; writes eval scalars, image panels and the IoU table."""
  summary, panels = evaluation.evaluate(config, p_eval_step, rstate.params, rstate.batch_stats,
                                        num_images=config.eval.num_images_to_log)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in summary.items() if np.isfinite(v)})
  if panels is not None:
    writer.write_images(step, {"eval/input_label_prediction": panels})
  embeddings.log_embeddings(config, rstate.params, rstate.batch_stats, writer, step)
  logging.info("step %d eval:\n%s", step, metrics_lib.format_table(
      {f"step {step}": summary}, labels_lib.class_names(config.num_classes)))
  return summary


def _checked_window(config, manager, writer, window, step_metrics) -> log_window.Summary:
  """The fetched log window; stops the run if it holds a non-finite step and `on_nan` is stop."""
  fetched = log_window.fetch(window, log_window.metric_names(step_metrics))
  if fetched.first_bad_step and config.train.on_nan != "skip":
    manager.wait_until_finished()
    writer.flush()
    good = manager.latest_step()
    where = (f"the last good checkpoint is step {good} in {manager.directory}"
             if good is not None else "no checkpoint was written yet")
    raise TrainingDiverged(f"{_non_finite_message(fetched)}; {where}. Lower train.lr, or set "
                           "train.on_nan='skip' to skip such updates")
  return fetched


def _non_finite_message(fetched: log_window.Summary) -> str:
  values = fetched.first_bad
  bad = sorted(k for k, v in values.items() if not np.isfinite(v))
  what = ", ".join(f"{k}={values[k]}" for k in bad) if bad else "a gradient (losses finite)"
  return f"training diverged: non-finite loss at step {fetched.first_bad_step}: {what}"


def _warn_skipped(fetched: log_window.Summary) -> None:
  """`train.on_nan` = skip: one warning per log window that skipped updates."""
  if fetched.first_bad_step:
    logging.warning("%s; update skipped (%d update(s) skipped in this log window)",
                    _non_finite_message(fetched), fetched.skipped)


def flat_hparams(config) -> dict:
  """The config as flat {"train.lr": 0.00025, ...} for the hparams log (non-scalars as text)."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}
