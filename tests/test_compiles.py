"""One compilation of the train step per run: fresh start, warm-up stage then adaptation, resume.

Each `trainer.train` builds its pmapped step once; the test counts the XLA compilations (a
persistent-cache hit counts too: it still means a retrace and a relowering) that happen inside
that step's calls, with `udajax.compiles.CompileCounter`. Before `train_step.replicate`, the
second call compiled again: the state made by `flax.jax_utils.replicate` sits on a mesh axis
named "_device_put_sharded", the state the step returns on the pmap's axis "batch".
"""

import contextlib

import flax
import jax
import numpy as np
import pytest

from tests import train_cli
from udajax import compiles
from udajax import log_window
from udajax import train_step as ts
from udajax import trainer


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
  return train_cli.demo_data_dir(tmp_path_factory)


def test_train_step_compiles_once_per_stage_fresh_and_resumed(demo_data_dir, tmp_path,
                                                                monkeypatch):
  runs = []  # (train.mode, counter) per built train step, in order
  real = log_window.make_p_train_step
  with contextlib.ExitStack() as stack:
    def counted(config, devices=None):
      counter = stack.enter_context(compiles.CompileCounter())
      runs.append((config.train.mode, counter))
      return counter.wrap(real(config, devices))
    monkeypatch.setattr(log_window, "make_p_train_step", counted)

    work = str(tmp_path / "run")
    overrides = {"train.num_steps": 3, "train.warmup_source_only_steps": 2}
    # Warm-up stage (2 steps) then adaptation, stopped after step 2 of 3.
    trainer.train_and_evaluate(train_cli.config(demo_data_dir, **overrides,
                                                **{"train.stop_step": 2}), work)
    # Restart: the finished warm-up stage only evaluates; adaptation resumes at step 2.
    trainer.train_and_evaluate(train_cli.config(demo_data_dir, **overrides), work)
  got = [(mode, c.count) for mode, c in runs]
  print("train step compilations per run:", got, [c.names for _, c in runs])
  assert got == [("source_only", 1), ("uda", 1), ("source_only", 0), ("uda", 1)], got
  assert train_cli.complete_steps(work)[-1] == 3


def test_replicated_state_has_the_sharding_the_step_returns():
  """The cause, directly: `ts.replicate` places arrays like the pmap's outputs (the mesh axis
  name is part of the sharding); `flax.jax_utils.replicate`'s default does not."""
  x = {"a": np.arange(3, dtype=np.float32), "step": np.int32(0)}
  ident = jax.pmap(lambda t: t, axis_name=ts.AXIS)
  ours = ts.replicate(x)
  out = ident(ours)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(out)):
    assert a.sharding == b.sharding, (a.sharding, b.sharding)
  flax_default = flax.jax_utils.replicate(x)
  assert flax_default["a"].sharding != out["a"].sharding
  np.testing.assert_array_equal(np.asarray(out["a"]), np.stack([x["a"]] * jax.local_device_count()))
