"""Relative error of each UDA loss term of the bfloat16 step against float32, per batch draw: the
measurements behind the tolerances of
`tests/test_step_modes.py::test_bfloat16_step_loss_terms_within_bf16_tolerance_of_float32`.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 \\
        python benchmarks/bf16_loss_terms.py [--seeds=1,5,7] [--output=FILE]

The model, state (a 30x classifier) and batch shapes are the test's (`tests/test_step_modes.py`:
`small_config`, `replicated_state`, `make_batch`); `--seeds` are the seeds of the batch draws
(the test uses 1). `loss_and_grads` is compiled in float32 and in bfloat16 for each draw, as the
test's fixture does. Prints one JSON line per seed (also appended to --output): seed, the
relative error |bf16 - f32| / max(|f32|, 1e-6) of every term, cpu.
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from benchmarks.common import cpu_name, emit_json  # noqa: E402
from tests.test_step_modes import (  # noqa: E402
    _compiled_loss_and_grads, make_batch, replicated_state, small_config,
)
from udajax import train_step as ts  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", default="1,5,7")
  p.add_argument("--output", default=None)
  a = p.parse_args()
  state = replicated_state(small_config(), scale_head=30.0)
  for seed in (int(s) for s in a.seeds.split(",")):
    batch = make_batch(np.random.default_rng(seed), source_hw=(96, 160), target_hw=(80, 128))
    terms = {}
    for dtype in ("float32", "bfloat16"):
      config = small_config(dtype)
      _, ((out, _, _), _) = _compiled_loss_and_grads(
          config, state.replace(apply_fn=ts.create_model(config).apply), batch)
      terms[dtype] = {k: float(v[0]) for k, v in jax.device_get(out).items()}
    f32, bf16 = terms["float32"], terms["bfloat16"]
    emit_json({"seed": seed, "rel_error": {k: float(f"{abs(bf16[k] - v) / max(abs(v), 1e-6):.2e}")
                                           for k, v in f32.items()},
               "cpu": cpu_name()}, a.output)


if __name__ == "__main__":
  main()
