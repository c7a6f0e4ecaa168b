"""benchmarks/profile_train_step.py on a tiny ResNet: the trace is read and every category filled.

The script parses jax.profiler's trace files and the compiled HLO, both formats that can change
between jax versions; this runs it end to end (one device, as its users do) and checks the
numbers it reports add up.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_script_attributes_the_step_time_to_categories(tmp_path):
  out = tmp_path / "profile.jsonl"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "benchmarks/profile_train_step.py", "--config=configs/gta.py",
         "--config.model.stage_blocks=(1, 1, 1, 1)", "--config.model.base_width=8",
         # 48×64 images: 6×8 feature maps, smaller than a 7×7 window (kernel gradients must
         # still be told from forward convolutions).
         "--config.source.image_size=(48, 64)", "--config.target.image_size=(48, 64)",
         "--steps=2", "--top=5", f"--trace_dir={tmp_path / 'trace'}", f"--output={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text().strip().splitlines()[-1])
  ms = result["udajax_ms"]
  # A ResNet step has k×k convolutions (forward, input and kernel gradient), 1×1 convolutions as
  # matrix products, and BN/ReLU/update kernels; each must have been found in the trace.
  for category in ("conv forward", "conv input gradient", "conv weight gradient", "matmul",
                   "reductions", "elementwise"):
    assert ms.get(category, 0) > 0, (category, ms)
  total, wall = sum(ms.values()), result["udajax_wall_ms"]
  # Operations can overlap on the cores (sum > wall), and the step has host-side overhead
  # (sum < wall), but the sum is of the step's own operations: the same order as the wall time.
  assert 0.3 * wall < total < 4 * wall, (total, wall)
  # The model's operations are most of the step; the rest is the losses and the update.
  by_part = result["udajax_ms_by_part"]
  model = sum(v for k, v in by_part.items() if k.startswith("model: "))
  assert 0.5 * total < model < total, by_part
  assert "slowest 5 single operations" in proc.stdout
