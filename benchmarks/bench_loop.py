"""How close the training loop comes to the bare train step, and how often it compiles the step.

    python benchmarks/bench_loop.py [--steps=400] [--warmup=20] [--rounds=3] [--output=FILE]

A tiny UDA model (DeepLab-v2 with a 4-channel ResNet stem, one block per stage, 32x32 crops,
1 image per domain per device: a step of a few milliseconds), on jax's default devices. Both
sides see the same pre-made batches (`--num_batches` of them, cycled); no dataset is read.

* bare: `train_step.make_p_train_step` called back to back on batches already on the devices;
  one wait at the end.
* loop: `trainer.train` itself (log window, TensorBoard writer, progress report, preemption
  poll, one log step every `--log_every` steps), fed the same host batches through its
  `trainer.prefetch_to_device`; evaluation is replaced by a stub that stops the clock
  (the last step's log fetch has waited for every step), checkpoints only at the end.

Timed: `--steps` steps after `--warmup` steps, per round (the loop's clock starts as step
warmup + 1 is dispatched, right after a log step waited for all earlier steps); the median over
`--rounds` rounds of each side (alternating) is reported. Also counted, per `trainer.train`
call: the XLA compilations of pmapped programs (`jit(_fun)`; only the train step is pmapped
while it runs; a persistent-cache hit counts too). The persistent compilation cache is off.

Also timed: placing 3,000 of the batches on the devices with `trainer.prefetch_to_device` and
with `flax.jax_utils.prefetch_to_device` (median of 3 each).

Prints one JSON line (also appended to --output): steps_per_s_bare, steps_per_s_loop, ratio
(loop / bare), step_compiles_per_start (one value per round), step_ms_bare, place_batch_us
(per batch, trainer / flax), devices, cpu.
"""

import contextlib
import importlib
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402

from benchmarks.common import cpu_name, emit_json  # noqa: E402
from udajax.cli import fail  # noqa: E402
from udajax import data  # noqa: E402
from udajax import train_step as ts  # noqa: E402
from udajax import trainer  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 400, "timed steps per round")
_WARMUP = flags.DEFINE_integer(
    "warmup", 25, "untimed steps first (compilation included); a multiple of --log_every")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "rounds of each side, alternating")
_LOG_EVERY = flags.DEFINE_integer("log_every", 25, "train.log_every_steps of the loop")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 8, "distinct batches, cycled")
_OUTPUT = flags.DEFINE_string("output", None, "append the JSON line to this file")

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def tiny_config(num_steps: int):
  c = importlib.import_module("configs.demo").get_config()
  c.model.base_width = 4
  for d in (c.source, c.target):
    d.image_size = (32, 32)
  t = c.train
  t.batch_size_per_device = 1
  t.num_steps = num_steps
  t.warmup_source_only_steps = 0
  t.log_every_steps = _LOG_EVERY.value
  t.checkpoint_every_steps = 10 ** 9
  c.eval.every_steps = 10 ** 9
  return c


def host_batches(config, n: int):
  """`n` random per-device batches (D, 1, 32, 32, ...) as numpy, like `data.train_batches`."""
  rng = np.random.default_rng(0)
  d, b = jax.local_device_count(), config.train.batch_size_per_device
  shape = (d, b) + tuple(config.source.image_size)
  return [{"source_image": rng.normal(size=shape + (3,)).astype(np.float32),
           "source_label": rng.integers(0, config.num_classes, size=shape).astype(np.int32),
           "target_image": rng.normal(size=shape + (3,)).astype(np.float32)} for _ in range(n)]


def time_bare(config, batches, warmup: int, steps: int) -> float:
  """Seconds for `steps` back-to-back calls of the bare pmapped step (after `warmup`)."""
  rng = jax.random.PRNGKey(0)
  state = ts.create_train_state(config, ts.init_variables(config, rng), rng)
  rstate = flax.jax_utils.replicate(state, axis_name=ts.AXIS)  # the step's own output placement
  dev = [flax.jax_utils.replicate(jax.tree_util.tree_map(lambda x: x[0], b), axis_name=ts.AXIS)
         for b in batches]
  p_step = ts.make_p_train_step(config)
  for i in range(warmup):
    rstate, _ = p_step(rstate, dev[i % len(dev)])
  jax.block_until_ready(rstate)
  start = time.perf_counter()
  for i in range(steps):
    rstate, _ = p_step(rstate, dev[i % len(dev)])
  jax.block_until_ready(rstate)
  return time.perf_counter() - start


def time_loop(config, batches, warmup: int, steps: int):
  """(seconds for `steps` loop steps after `warmup`, pmapped compilations during the run)."""
  clock = {}

  def train_batches(config, start_step):
    del config, start_step
    i = 0
    while True:
      yield batches[i % len(batches)]
      i += 1

  class StepAnnotation(contextlib.nullcontext):
    """Stands in for `jax.profiler.StepTraceAnnotation`: starts the clock at step warmup + 1."""

    def __init__(self, name, step_num):
      super().__init__()
      if step_num == warmup + 1:
        clock["start"] = time.perf_counter()

  def evaluate_and_log(*args, **kwargs):
    del args, kwargs
    clock.setdefault("stop", time.perf_counter())
    return {"mIoU": 0.0}

  compiled = []

  def on_event(event, duration, **kwargs):
    del duration
    if event == BACKEND_COMPILE_EVENT and "_fun" in str(kwargs.get("fun_name", "")):
      compiled.append(kwargs.get("fun_name"))

  saved = (data.train_batches, data.prepare_datasets, trainer.evaluate_and_log,
           jax.profiler.StepTraceAnnotation)
  data.train_batches, data.prepare_datasets = train_batches, lambda *a, **k: None
  trainer.evaluate_and_log, jax.profiler.StepTraceAnnotation = evaluate_and_log, StepAnnotation
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    with tempfile.TemporaryDirectory() as workdir:
      trainer.train(config, workdir)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
    (data.train_batches, data.prepare_datasets, trainer.evaluate_and_log,
     jax.profiler.StepTraceAnnotation) = saved
  return clock["stop"] - clock["start"], len(compiled)


def place_batch_us(prefetch, batches, n: int = 3000) -> float:
  """Microseconds per batch for `prefetch(iterator, 2)` to place `n` of `batches` (cycled)."""
  it = prefetch((batches[i % len(batches)] for i in range(n)), 2)
  start = time.perf_counter()
  for placed in it:
    pass
  jax.block_until_ready(placed)
  return 1e6 * (time.perf_counter() - start) / n


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)
  warmup, steps = _WARMUP.value, _STEPS.value
  if warmup % _LOG_EVERY.value or steps % _LOG_EVERY.value:
    fail(f"--warmup={warmup} and --steps={steps} must be multiples of --log_every="
         f"{_LOG_EVERY.value} (the loop's clock starts and stops at log steps)")
  config = tiny_config(warmup + steps)
  batches = host_batches(config, _NUM_BATCHES.value)
  bare, loop, compiles = [], [], []
  for r in range(_ROUNDS.value):
    bare.append(time_bare(config, batches, warmup, steps))
    seconds, n = time_loop(config, batches, warmup, steps)
    loop.append(seconds)
    compiles.append(n)
    print(f"round {r + 1}: bare {steps / bare[-1]:.1f} steps/s, loop {steps / loop[-1]:.1f} "
          f"steps/s, train-step compilations in the loop's run: {n}", flush=True)
  bare_s, loop_s = statistics.median(bare), statistics.median(loop)
  place = {name: statistics.median(place_batch_us(f, batches) for _ in range(3)) for name, f in
           (("trainer", trainer.prefetch_to_device), ("flax", flax.jax_utils.prefetch_to_device))}
  result = {"steps_per_s_bare": round(steps / bare_s, 2),
            "steps_per_s_loop": round(steps / loop_s, 2),
            "ratio": round(bare_s / loop_s, 3), "step_compiles_per_start": compiles,
            "step_ms_bare": round(1000 * bare_s / steps, 3), "steps": steps,
            "log_every_steps": _LOG_EVERY.value, "devices": jax.local_device_count(),
            "place_batch_us": {k: round(v, 1) for k, v in place.items()},
            "backend": jax.default_backend(), "cpu": cpu_name(), "jax": jax.__version__}
  emit_json(result, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
