"""End to end: train_and_evaluate on the demo data with a tiny model; logs, checkpoints, resume,
and one compilation of the train step per run (fresh, resumed, each stage of a warm-up run).

The compilations are counted with `udajax.compiles.CompileCounter` around the calls of each
built train step: every XLA compilation inside them counts, a persistent-cache hit too (it still
means the step was traced and lowered again). Before `train_step.replicate`, the second call
compiled again: the state made by `flax.jax_utils.replicate` sat on a mesh axis named
"_device_put_sharded", the state the step returns on the pmap's axis "batch".
"""

import contextlib

import glob
import json
import os

import jax
import numpy as np
import pytest

from tests import train_cli
from udajax import checkpoints
from udajax import compiles
from udajax import evaluation
from udajax import labels
from udajax import log_window
from udajax import metrics
from udajax import trainer


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
  return train_cli.demo_data_dir(tmp_path_factory)  # one demo build per test session


@pytest.fixture
def step_compiles(monkeypatch):
  """[(train.mode, compilations)] of every train step the trainer builds, in order."""
  runs = []
  real = log_window.make_p_train_step
  with contextlib.ExitStack() as stack:
    def counted(config, devices=None):
      counter = stack.enter_context(compiles.CompileCounter())
      runs.append((config.train.mode, counter))
      return counter.wrap(real(config, devices))
    monkeypatch.setattr(log_window, "make_p_train_step", counted)
    yield lambda: [(mode, c.count) for mode, c in runs]


def tiny_demo_config(data_dir, **train):
  """`train_cli.config` (the tiny demo run of the subprocess tests, whose train step this one
  shares through the persistent compilation cache: only the logging, checkpoint and eval
  cadence differ) with 10 steps, a log every 2, a checkpoint every 5 and one eval at the end,
  which logs its images; `train` overrides `config.train` entries."""
  c = train_cli.config(data_dir, **{
      "train.log_every_steps": 2, "train.checkpoint_every_steps": 5, "eval.every_steps": 10,
      "eval.batch_size_per_device": 8, "eval.num_images_to_log": 3})
  for k, v in train.items():
    c.train[k] = v
  return c


def event_tags(workdir):
  from tensorboard.backend.event_processing import event_accumulator
  tags = set()
  for f in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(f, size_guidance={"tensors": 0})
    acc.Reload()
    tags |= set(acc.Tags()["tensors"])
  return tags


def final_params(workdir):
  return checkpoints.load_workdir_variables(workdir)["params"]


def test_train_logs_checkpoints_and_resumes_exactly(demo_data_dir, tmp_path, step_compiles):
  full = str(tmp_path / "full")
  result = trainer.train_and_evaluate(tiny_demo_config(demo_data_dir), full)
  assert 0.0 <= result["mIoU"] <= 100.0 and "IoU/road" in result
  tags = event_tags(full)
  for name in ["train/ce", "train/em", "train/clustering", "train/c_dist", "train/f_dist_source",
               "train/f_dist_target", "train/orthogonality", "train/sparsity", "train/total",
               "train/lr", "steps_per_sec", "eval/mIoU", "eval/pixel_accuracy", "eval/IoU/road",
               "eval/input_label_prediction"]:
    assert name in tags, name
  steps = sorted(int(os.path.basename(p))
                 for p in glob.glob(os.path.join(full, "checkpoints", "[0-9]*")))
  assert steps == [5, 10]

  # Interrupted at step 5, then restarted in the same workdir: same final parameters.
  part = str(tmp_path / "part")
  trainer.train_and_evaluate(tiny_demo_config(demo_data_dir, stop_step=5), part)
  trainer.train_and_evaluate(tiny_demo_config(demo_data_dir), part)
  a, b = final_params(full), final_params(part)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert np.max(np.abs(x - y)) <= 1e-6 * max(np.max(np.abs(x)), 1e-12)
  # One compilation per run: the fresh run, the stopped one and the resumed one.
  assert step_compiles() == [("uda", 1)] * 3, step_compiles()


def test_warmup_stage_then_adaptation(demo_data_dir, tmp_path, step_compiles):
  """Two stages on copies of the config: the caller's config is left as it was. The adaptation
  stage is the 10-step tiny run of the other tests (its train step a persistent-cache hit)."""
  config = tiny_demo_config(demo_data_dir, warmup_source_only_steps=2)
  before = config.to_json()
  result = trainer.train_and_evaluate(config, str(tmp_path / "demo"))
  assert config.to_json() == before
  assert 0 <= result["source_only"]["mIoU"] <= 100 and 0 <= result["mIoU"] <= 100
  table = metrics.format_table(metrics.run_columns(result, "uda"), labels.class_names(19))
  assert "source only" in table and "adapted" in table and "mIoU" in table
  assert os.path.isdir(tmp_path / "demo" / "source_only" / "checkpoints")
  adapted = json.load(open(tmp_path / "demo" / "config.json"))
  assert adapted["init_checkpoint"] == str(tmp_path / "demo" / "source_only")
  assert adapted["train"]["mode"] == "uda"
  source = json.load(open(tmp_path / "demo" / "source_only" / "config.json"))
  assert source["train"]["mode"] == "source_only" and source["train"]["num_steps"] == 2
  assert step_compiles() == [("source_only", 1), ("uda", 1)], step_compiles()


def test_best_checkpoint_kept_across_restarts_and_selected(tmp_path):
  import orbax.checkpoint as ocp
  from udajax import configuration
  config = configuration.base_config()
  config.train.keep_checkpoints = 1
  workdir = str(tmp_path / "wd")

  def save(manager, step, score):
    tree = {"params": {"w": np.full((2,), float(step), np.float32)}, "batch_stats": {}}
    manager.save(step, args=ocp.args.StandardSave(tree),
                 metrics=None if score is None else {checkpoints.BEST_METRIC: score})

  manager = checkpoints.checkpoint_manager(workdir, config.train.keep_checkpoints)
  for step, score in ((1, 50.0), (2, 10.0), (3, 20.0)):
    save(manager, step, score)
  manager.wait_until_finished()
  assert manager.best_step() == 1 and manager.all_steps() == [1, 3]
  manager.close()
  # A restarted job.
  manager = checkpoints.checkpoint_manager(workdir, config.train.keep_checkpoints)
  save(manager, 4, None)
  save(manager, 5, 5.0)
  manager.wait_until_finished()
  assert manager.best_step() == 1 and 1 in manager.all_steps() and 5 in manager.all_steps()
  manager.close()
  np.testing.assert_array_equal(
      checkpoints.load_workdir_variables(workdir, "best")["params"]["w"], [1, 1])
  np.testing.assert_array_equal(checkpoints.load_workdir_variables(workdir)["params"]["w"], [5, 5])
  assert evaluation.selection_metric(16) == "mIoU13" and evaluation.selection_metric(19) == "mIoU"
