"""`python -m udajax.evaluate`: converted checkpoints, a head-less one rejected, `--which` picking
the best or the latest checkpoint of a work directory, and `--output_json`."""

import importlib
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import train_cli
from udajax import checkpoints
from udajax import evaluation
from udajax import labels
from udajax import train_step as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
  return train_cli.demo_data_dir(tmp_path_factory)


def tiny_config(data_dir):
  config = importlib.import_module("configs.demo").get_config()
  config.data_dir = data_dir
  config.model.base_width = 4
  config.eval.batch_size_per_device = 8
  config.eval.split = "validation[:32]"
  return config


def constant_variables(config, class_index: int):
  """Variables of the tiny model that predicts `class_index` at every pixel (the classifier's
  kernels zero, its biases one-hot): which checkpoint was loaded shows in the predictions."""
  variables = jax.device_get(ts.init_variables(config, jax.random.PRNGKey(0)))
  head = variables["params"]["classifier"]
  for branch in head.values():
    branch["kernel"] = np.zeros_like(branch["kernel"])
    branch["bias"] = np.where(np.arange(config.num_classes) == class_index, 10.0, 0.0).astype(
        np.float32)
  return variables


def test_evaluate_converted_checkpoint_and_reject_headless(demo_data_dir, tmp_path):
  config = tiny_config(demo_data_dir)
  variables = jax.device_get(ts.init_variables(config, jax.random.PRNGKey(0)))
  path = checkpoints.save_variables(str(tmp_path / "converted"), variables)

  result = evaluation.evaluate_checkpoint(config, path)
  assert 0.0 <= result["mIoU"] <= 100.0 and 0.0 <= result["pixel_accuracy"] <= 100.0
  assert result["num_images"] == 32 and result["step"] is None
  assert "mIoU13" not in result

  headless = {"params": {"backbone": variables["params"]["backbone"]},
              "batch_stats": variables["batch_stats"]}
  path2 = checkpoints.save_variables(str(tmp_path / "imagenet"), headless)
  with pytest.raises(checkpoints.CheckpointError, match="no classifier"):
    evaluation.evaluate_checkpoint(config, path2)


def test_which_best_and_latest_pick_their_steps(demo_data_dir, tmp_path):
  """A work directory whose best checkpoint (by the score stored with it) is not its latest:
  step 2 predicts sky everywhere and has the best score, step 3 predicts building and is the
  latest; step 1 (road) is neither, and is deleted by the trainer's keep policy."""
  config = tiny_config(demo_data_dir)
  sky, building, road = (labels.CITYSCAPES_CLASSES.index(n) for n in ("sky", "building", "road"))
  workdir = str(tmp_path / "work")
  manager = checkpoints.checkpoint_manager(workdir, keep=1)
  for step, cls, score in ((1, road, 30.0), (2, sky, 80.0), (3, building, 10.0)):
    state = ts.create_train_state(config, constant_variables(config, cls), jax.random.PRNGKey(0))
    checkpoints.save_state(manager, step, state, score=score)
  manager.wait_until_finished()
  manager.close()
  assert sorted(checkpoints.complete_steps(checkpoints.checkpoint_manager(workdir, 1))) == [2, 3]

  # The command line, best (the default), with --output_json.
  out = tmp_path / "json" / "best.json"
  proc = subprocess.run(
      [sys.executable, "-m", "udajax.evaluate", "--config=configs/demo.py",
       f"--config.data_dir={demo_data_dir}", "--config.model.base_width=4",
       "--config.eval.batch_size_per_device=8", "--config.eval.split=validation[:32]",
       f"--checkpoint={workdir}", "--which=best", f"--output_json={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=train_cli.env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "(step 2)" in proc.stdout and "sky" in proc.stdout
  best = json.loads(out.read_text())
  assert best["step"] == 2 and best["num_images"] == 32
  assert best["IoU/sky"] > 0 and best["IoU/building"] == 0.0 and best["IoU/road"] == 0.0
  # Only sky is predicted: pixel accuracy = the sky fraction of the labels = IoU of sky.
  assert best["pixel_accuracy"] == pytest.approx(best["IoU/sky"])
  # One flat object: the printed summary's keys, null for classes absent from labels and
  # predictions (the tiny demo has no rider, say), plus num_images and step.
  names = labels.CITYSCAPES_CLASSES
  assert set(best) == ({"mIoU", "pixel_accuracy", "num_images", "step"} |
                       {f"IoU/{n}" for n in names})
  present = [best[f"IoU/{n}"] for n in names if best[f"IoU/{n}"] is not None]
  assert any(best[f"IoU/{n}"] is None for n in names)
  assert best["mIoU"] == pytest.approx(sum(present) / len(present))

  latest = evaluation.evaluate_checkpoint(tiny_config(demo_data_dir), workdir, which="latest")
  assert latest["step"] == 3
  assert latest["IoU/building"] > 0 and latest["IoU/sky"] == 0.0
  assert latest["pixel_accuracy"] == pytest.approx(latest["IoU/building"])
  for name in names:  # the JSON holds the same numbers the library returns (NaN as null)
    value = evaluation.summary_to_json(latest)[f"IoU/{name}"]
    assert (value is None) == math.isnan(latest[f"IoU/{name}"])


def test_output_json_unwritable_is_one_error_line(demo_data_dir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  proc = subprocess.run(
      [sys.executable, "-m", "udajax.evaluate", "--config=configs/demo.py",
       f"--config.data_dir={demo_data_dir}", f"--checkpoint={tmp_path / 'none'}",
       f"--output_json={blocker / 'x.json'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=train_cli.env())
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  (line,) = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
  assert "--output_json" in line
