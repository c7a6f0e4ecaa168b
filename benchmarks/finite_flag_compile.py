"""Compile time of the train step with the NaN/Inf flag combined by `jnp.all` (before) and by a
cumulative sum (`train_step._all_finite`, now), and whether both give bit-identical results.

    python benchmarks/finite_flag_compile.py [--models=tiny,demo] [--repeats=2] [--output=FILE]
    python benchmarks/finite_flag_compile.py --models=resnet101 --repeats=1   # ~4 min on CPU

The step is `train_step.make_p_train_step` on one device, lowered from each model's state and a
random batch (`bench_train_step.make_batch`), once with each flag, then compiled with the
persistent compilation cache off, alternating before/now `--repeats` times. Models: "tiny" (the
subprocess tests' config, `tests/train_cli.py`: 4-channel stem, one block per stage), "demo"
(`configs/demo.py`) and "resnet101" (`configs/gta.py`, the paper step; lowered from abstract
shapes, compiled, not run). For tiny and demo, both executables then run the same four steps
from the same state, the last with a NaN in the source image (a skipped step), and every leaf of
the final states and metrics is compared (`np.array_equal`).

Prints one JSON line per compile (also appended to --output): model, flag, compile_s, fusions
and scalar_ands (the optimised HLO's fusion count and its number of `and` instructions: the
duplicated chain shows as thousands), cpu; and per model one line with bit_identical.
"""

import argparse
import os
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_train_step import abstract_state, make_batch  # noqa: E402
from benchmarks.common import cpu_name, emit_json  # noqa: E402
from configs import demo, gta  # noqa: E402
from tests import train_cli  # noqa: E402
from udajax import train_step as ts  # noqa: E402


def all_finite_before(tree):
  """The flag as computed before: `jnp.all` over the stacked per-leaf flags."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


FLAGS = {"before (jnp.all)": all_finite_before, "now (cumsum)": ts._all_finite}


def model_config(name):
  if name == "tiny":
    return train_cli.config("/unused")
  if name == "demo":
    return demo.get_config()
  if name == "resnet101":
    return gta.get_config()
  raise SystemExit(f"error: unknown model {name!r} (tiny, demo, resnet101)")


def lower(config, state, batch, flag):
  """The step lowered with `flag` as the train step's NaN/Inf check."""
  saved = ts._all_finite
  ts._all_finite = flag
  try:
    return ts.make_p_train_step(config, devices=jax.devices()[:1], donate=False).lower(
        state, batch)
  finally:
    ts._all_finite = saved


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="tiny,demo")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--output", default=None)
  a = p.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  for name in a.models.split(","):
    c = model_config(name)
    rng = np.random.default_rng(0)
    batch = make_batch(c, rng)
    run = name != "resnet101"
    if run:
      state = ts.replicate(ts.create_train_state(
          c, ts.init_variables(c, jax.random.PRNGKey(0)), jax.random.PRNGKey(1)),
          jax.devices()[:1])
    else:
      state = abstract_state(c)
    executables = {}
    for _ in range(a.repeats):
      for k, f in FLAGS.items():
        jax.clear_caches()  # a new lowering and compile each time
        low = lower(c, state, batch, f)
        start = time.perf_counter()
        executables[k] = low.compile()
        seconds = time.perf_counter() - start
        hlo = executables[k].as_text().split("ENTRY", 1)
        emit_json({"model": name, "flag": k, "compile_s": round(seconds, 2),
                   "fusions": len(re.findall(r"= \S+ fusion\(", hlo[1])),
                   "scalar_ands": len(re.findall(r" and\(", "".join(hlo))),
                   "cpu": cpu_name()}, a.output)
    if not run:
      continue
    nan_batch = dict(batch, source_image=batch["source_image"].copy())
    nan_batch["source_image"][0, 0, 0, 0, 0] = np.nan
    results, flags, batches = [], [], (batch, make_batch(c, rng), batch, nan_batch)
    for k, executable in executables.items():
      s, finite = state, []
      for b in batches:
        s, metrics = executable(s, b)
        finite.append(float(metrics["finite"][0]))
      results.append(jax.tree_util.tree_leaves(jax.device_get((s, metrics))))
      flags.append(finite)
    pairs = list(zip(results[0], results[1], strict=True))
    same = all(np.array_equal(x, y, equal_nan=True) for x, y in pairs)
    differ = sum(not np.array_equal(x, y, equal_nan=True) for x, y in pairs)
    emit_json({"model": name, "bit_identical": same, "leaves_differing": differ,
               "leaves": len(pairs), "finite_per_step": dict(zip(FLAGS, flags)),
               "cpu": cpu_name()}, a.output)


if __name__ == "__main__":
  main()
