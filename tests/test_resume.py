"""Exact resume after SIGKILL, SIGTERM preemption, and unfinished checkpoints (docs/RESILIENCE.md).

One scenario, three `python train.py` processes in one work directory, against an uninterrupted
in-process run of the same config:
  A  killed with SIGKILL once a checkpoint >= 2 is committed;
     then an unfinished step directory (no commit marker) and an orbax tmp directory are planted
     above the last complete checkpoint, as a save killed mid-way could leave them;
  B  resumes (must ignore both), gets SIGTERM once it has made progress: finishes the step, saves
     a checkpoint and exits 0;
  C  resumes from B's checkpoint and finishes.
Final parameters and every logged train/eval scalar (every step is logged) must equal the
uninterrupted run's: data order, augmentation, RNG and centroid EMA state all survive.
"""

import os
import re
import shutil
import signal
import time

import pytest

from tests import train_cli
from udajax import checkpoints
from udajax import trainer


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
  return train_cli.demo_data_dir(tmp_path_factory)


def test_sigkill_sigterm_and_unfinished_checkpoints_resume_exactly(demo_data_dir, tmp_path):
  num_steps = train_cli.TINY["train.num_steps"]
  ref = str(tmp_path / "ref")
  trainer.train_and_evaluate(train_cli.config(demo_data_dir), ref)
  assert train_cli.complete_steps(ref)[-1] == num_steps

  work = str(tmp_path / "work")
  args = train_cli.flags(demo_data_dir, work)

  # A: SIGKILL after a committed checkpoint.
  proc = train_cli.start(args, str(tmp_path / "a.log"))
  train_cli.wait_for_step(proc, work, 2)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  k = train_cli.complete_steps(work)[-1]
  assert 2 <= k < num_steps, f"the kill landed too late (step {k}); slow machine?"

  # Half-written saves: a step directory without orbax's commit marker (a copy of step k, so
  # resuming from it would silently skip a step) and an orbax temporary directory.
  ckpts = os.path.join(work, "checkpoints")
  shutil.copytree(os.path.join(ckpts, str(k)), os.path.join(ckpts, str(k + 1)), dirs_exist_ok=True)
  os.remove(os.path.join(ckpts, str(k + 1), "commit_success.txt"))
  os.makedirs(os.path.join(ckpts, f"{k + 2}.orbax-checkpoint-tmp-1234567", "default"))

  # B: resumes from k, SIGTERM once it saved a later step; it must exit 0 with a checkpoint.
  proc = train_cli.start(args, str(tmp_path / "b.log"))
  train_cli.wait_for_step(proc, work, k + 2)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=120)
  latency = time.time() - sent
  log_b = open(tmp_path / "b.log").read()
  assert rc == 0, log_b[-3000:]
  assert f"Resumed from {work} at step {k}" in log_b
  m = re.search(r"preempted: stopped at step (\d+) after saving a checkpoint", log_b)
  assert m, log_b[-3000:]
  s = int(m.group(1))
  assert k + 2 <= s < num_steps and train_cli.complete_steps(work)[-1] == s
  assert latency < 10  # a scheduler's SIGKILL typically follows SIGTERM after 30 s
  print(f"SIGTERM -> exit 0 in {latency:.2f} s (stopped at step {s})")
  names = os.listdir(ckpts)
  assert any(n.startswith(f"{k + 1}.incomplete") for n in names), names  # moved aside, kept
  assert not any("orbax-checkpoint-tmp" in n for n in names), names  # orbax cleaned it up
  assert "Traceback" not in log_b

  # C: resumes from the preemption checkpoint and finishes.
  result = train_cli.run(args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from {work} at step {s}" in result.stderr

  err = train_cli.max_rel_error(checkpoints.load_workdir_variables(ref)["params"],
                                checkpoints.load_workdir_variables(work)["params"])
  print(f"final params max rel. error vs uninterrupted: {err:.3g}")
  assert err <= 1e-6

  want, got = train_cli.scalars(ref), train_cli.scalars(work)
  tags = [t for t in want if t.startswith(("train/", "eval/"))]
  assert "train/total" in tags and "train/orthogonality" in tags and "eval/mIoU" in tags
  for tag in tags:
    assert sorted(got[tag]) == sorted(want[tag]), tag  # every step logged (some twice)
    for step, (value,) in want[tag].items():
      for v in got[tag][step]:  # steps after a checkpoint were logged again after the restart
        assert abs(v - value) <= 1e-6 * max(abs(value), 1e-6), (tag, step, v, value)
