"""Divergence guard (`train.on_nan`): a NaN/Inf loss stops with one clear line and keeps the last
good checkpoint ("stop"), or the update is skipped and counted in `train/skipped_steps` ("skip").

A learning rate of 1e8 blows the tiny demo model up: step 2's loss is huge but finite, step 3's
is NaN.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import train_cli
from udajax import checkpoints
from udajax import trainer
from udajax.errors import TrainingDiverged

DIVERGE = {"train.lr": 1e8, "train.num_steps": 6}


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
  return train_cli.demo_data_dir(tmp_path_factory)


def test_stop_on_nan_one_line_keeps_last_good_checkpoint(demo_data_dir, tmp_path):
  work = str(tmp_path / "run")
  r = train_cli.run(train_cli.flags(demo_data_dir, work, **DIVERGE))
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  line = errors[0]
  assert line.startswith("error: training diverged: non-finite loss at step 3: "), line
  assert "total=nan" in line and "ce=nan" in line, line
  assert f"the last good checkpoint is step 2 in {work}/checkpoints" in line, line
  assert "train.on_nan='skip'" in line and "train.lr" in line
  assert train_cli.complete_steps(work) == [1, 2]
  params = checkpoints.load_workdir_variables(work)["params"]
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_skip_on_nan_continues_and_counts(demo_data_dir, tmp_path):
  work = str(tmp_path / "run")
  c = train_cli.config(demo_data_dir, **{**DIVERGE, "train.on_nan": "skip"})  # same compilation
  trainer.train_and_evaluate(c, work)
  skipped = train_cli.scalars(work)["train/skipped_steps"]
  assert sorted(skipped) == [1, 2, 3, 4, 5, 6]
  assert skipped[1] == [0.0] and skipped[2] == [0.0] and skipped[3] == [1.0], skipped
  assert train_cli.complete_steps(work)[-1] == 6
  params = checkpoints.load_workdir_variables(work)["params"]
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))
  # Steps 5 and 6 were both skipped: the loop saved the same params, momentum, BN statistics and
  # centroid state (bit for bit) at both, and only the step counters moved.
  assert skipped[5] == [1.0] and skipped[6] == [1.0], skipped
  manager = checkpoints.checkpoint_manager(work, read_only=True)
  trees = [manager.restore(step, args=ocp.args.StandardRestore()) for step in (5, 6)]
  assert int(trees[0]["step"]) == 5 and int(trees[1]["step"]) == 6
  flat5, flat6 = ({jax.tree_util.keystr(k): np.asarray(v)
                   for k, v in jax.tree_util.tree_leaves_with_path(t)} for t in trees)
  assert flat5.keys() == flat6.keys()
  assert any(k.startswith("['centroid_state']") for k in flat5)
  for key in flat5:
    if key.endswith((".count", "['count']")) or key in ("['step']", "['rng']"):
      continue
    np.testing.assert_array_equal(flat6[key], flat5[key], err_msg=key)
  assert all(np.all(np.isfinite(v)) for k, v in flat6.items() if k != "['rng']")


def test_stop_found_at_the_next_save_names_the_first_bad_step(demo_data_dir, tmp_path):
  """The loop fetches its on-device log window only at log / eval / checkpoint steps: with step 3
  non-finite, a log every 5 steps and a checkpoint every 2, the run stops at step 4's save,
  names step 3 and saves nothing after step 2."""
  work = str(tmp_path / "run")
  c = train_cli.config(demo_data_dir, **{**DIVERGE, "train.log_every_steps": 5,
                                         "train.checkpoint_every_steps": 2})
  with pytest.raises(TrainingDiverged) as e:
    trainer.train_and_evaluate(c, work)
  message = str(e.value)
  assert message.startswith("training diverged: non-finite loss at step 3: "), message
  assert "total=nan" in message and "ce=nan" in message, message
  assert f"the last good checkpoint is step 2 in {work}/checkpoints" in message, message
  assert train_cli.complete_steps(work) == [2]
