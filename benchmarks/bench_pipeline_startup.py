"""Start-up of the input pipeline: seconds from `train_iterator` / `eval_iterator` to the first
batch, with the map functions traced as written (what udajax does) and through TensorFlow's
AutoGraph (`tf.data`'s default, what udajax did before).

    python benchmarks/bench_pipeline_startup.py [--data_dir=DIR] [--pairs=3] [--output=FILE]

Uses the demo dataset in --data_dir (built there first if missing, ~10 s). Each measurement runs
in a fresh Python process (AutoGraph caches its conversions within a process), the two variants
alternating, --pairs of each. A measurement times, after jax and TensorFlow are imported: the
source training iterator to its first batch (4 devices x 1 image, the stored size, augmentation
on), the target one, and the eval iterator of `validation[:8]`. It also checks that the variant's
first batches are bit-identical to the other's (a digest of every array).

Prints one JSON line per measurement and a summary line (medians; also appended to --output).
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _child(data_dir: str, autograph: bool) -> dict:
  import jax
  jax.devices()
  import numpy as np
  import tensorflow as tf
  from benchmarks.common import cpu_name
  from udajax import input_pipeline as ip
  if autograph:  # the previous behaviour: tf.data's map with AutoGraph conversion
    ip._map = lambda ds, fn: ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  digest = hashlib.sha256()
  out = {"autograph": autograph}
  common = dict(data_dir=data_dir, batch_size_per_device=1, num_local_devices=4, num_classes=19)
  for name, make in [
      ("source_s", lambda: ip.train_iterator("udajax_demo", builder_config="source",
                                             split="train", seed=0, **common)),
      ("target_s", lambda: ip.train_iterator("udajax_demo", builder_config="target",
                                             split="train", seed=0, with_labels=False, **common)),
      ("eval_s", lambda: ip.eval_iterator("udajax_demo", builder_config="target",
                                          split="validation[:8]", **common))]:
    start = time.perf_counter()
    batch = next(iter(make()))
    out[name] = round(time.perf_counter() - start, 3)
    for key in sorted(batch):
      x = np.asarray(batch[key])
      if x.dtype == object:  # file names (bytes)
        digest.update(b"\0".join(x.ravel().tolist()))
      else:
        digest.update(np.ascontiguousarray(x).tobytes())
  out["digest"] = digest.hexdigest()[:16]
  out["cpu"] = cpu_name()
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default="/tmp/udajax_bench_demo")
  p.add_argument("--pairs", type=int, default=3)
  p.add_argument("--output", default=None)
  p.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    print(json.dumps(_child(a.data_dir, a.child == "on")), flush=True)
    return
  from udajax import datasets
  datasets.ensure_demo_built(a.data_dir)
  runs = {"on": [], "off": []}
  for _ in range(a.pairs):
    for variant in ("on", "off"):
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant,
                             f"--data_dir={a.data_dir}"], capture_output=True, text=True,
                            check=True)
      line = proc.stdout.strip().splitlines()[-1]
      print(line, flush=True)
      runs[variant].append(json.loads(line))
  digests = {r["digest"] for rs in runs.values() for r in rs}
  summary = {"pairs": a.pairs, "bit_identical": len(digests) == 1, "cpu": runs["on"][0]["cpu"]}
  for variant, label in (("on", "autograph"), ("off", "udajax")):
    for key in ("source_s", "target_s", "eval_s"):
      summary[f"{label}_{key}"] = round(statistics.median(r[key] for r in runs[variant]), 3)
  line = json.dumps(summary)
  print(line)
  if a.output:
    with open(a.output, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
