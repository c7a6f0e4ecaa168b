"""Compile time of the tests' tiny train step under XLA compile options, and whether each option
keeps the step's results bit-identical to XLA's defaults.

    python benchmarks/step_compile_options.py [--output=FILE]

The step: `train_step.make_p_train_step` of the subprocess tests' tiny demo config
(`tests/train_cli.py`, 4-channel stem, one block per stage, the UDA objective), one device,
random inputs. It is lowered once, then compiled with the defaults and with each option in
`OPTIONS` (the persistent compilation cache off, so every compile is real), and each executable
runs three steps from the same state; the final state and metrics are compared with the
defaults' leaf by leaf (`np.array_equal`). The defaults are compiled again at the end, from a
new lowering, to show the run-to-run spread. An option the installed XLA does not know is
reported with its error.

Prints one JSON line per setting (also appended to --output): options, compile_s,
bit_identical, cpu.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from benchmarks.bench_train_step import make_batch  # noqa: E402
from benchmarks.common import cpu_name, emit_json  # noqa: E402
from tests import train_cli  # noqa: E402
from udajax import train_step as ts  # noqa: E402

OPTIONS = [
    {"xla_backend_optimization_level": 1},
    {"xla_backend_optimization_level": 0},
    {"xla_llvm_disable_expensive_passes": True},
    {"xla_cpu_use_fusion_emitters": False},
    {"xla_cpu_enable_concurrency_optimized_scheduler": False},
    {"xla_cpu_parallel_codegen_split_count": 1},
    {"xla_cpu_use_xnnpack": False},
    {"xla_cpu_copy_insertion_use_region_analysis": False},
    {"xla_cpu_emitter_verification_level": 0},
]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--output", default=None)
  a = p.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  c = train_cli.config("/unused")  # no data is read
  devices = jax.devices()[:1]
  state = ts.replicate(ts.create_train_state(c, ts.init_variables(c, jax.random.PRNGKey(0)),
                                             jax.random.PRNGKey(1)), devices)
  batch = make_batch(c, np.random.default_rng(0))
  lowered = ts.make_p_train_step(c, devices=devices, donate=False).lower(state, batch)

  def run(options):
    start = time.perf_counter()
    executable = lowered.compile(options)
    seconds = time.perf_counter() - start
    s = state
    for _ in range(3):
      s, metrics = executable(s, batch)
    return seconds, jax.tree_util.tree_leaves(jax.device_get((s, metrics)))

  base_s, reference = run(None)
  emit_json({"options": "default", "compile_s": round(base_s, 2), "bit_identical": True,
             "cpu": cpu_name()}, a.output)
  for options in OPTIONS:
    try:
      seconds, leaves = run(options)
    except Exception as e:  # noqa: BLE001  (an option this XLA build does not have)
      emit_json({"options": options, "error": str(e).splitlines()[0][:120]}, a.output)
      continue
    same = all(np.array_equal(x, y) for x, y in zip(reference, leaves, strict=True))
    emit_json({"options": options, "compile_s": round(seconds, 2), "bit_identical": same,
               "cpu": cpu_name()}, a.output)
  jax.clear_caches()  # and a new lowering: the first compile would be reused otherwise
  lowered = ts.make_p_train_step(c, devices=devices, donate=False).lower(state, batch)
  seconds, _ = run(None)
  emit_json({"options": "default (again)", "compile_s": round(seconds, 2), "bit_identical": True,
             "cpu": cpu_name()}, a.output)


if __name__ == "__main__":
  main()
