"""Time of a first start vs a restart of `python train.py`, with and without the persistent
compilation cache (train.py's --compilation_cache_dir, on by default under the work directory).

    python benchmarks/bench_restart.py [--config=configs/demo.py] [--steps=2] [--override=...]

For each setting: a fresh work directory runs to step `steps` (first start: compiles), then the
same command is run again to step 2 * `steps` (a restart, as after preemption: resumes from the
checkpoint). Prints the wall time and the CPU time (user + system, of the child process) of
every run and one JSON line per setting.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(config, workdir, stop_step, overrides, cache):
  args = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config}",
          f"--workdir={workdir}", f"--config.train.stop_step={stop_step}",
          f"--config.train.num_steps={stop_step * 10}", "--config.eval.every_steps=100000",
          "--config.train.warmup_source_only_steps=0", "--config.train.checkpoint_every_steps=1",
          f"--compilation_cache_dir={cache}"] + list(overrides)
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  start, cpu = time.perf_counter(), _children_cpu()
  subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True)
  return time.perf_counter() - start, _children_cpu() - cpu


def _children_cpu():
  """User + system CPU seconds of finished child processes (less sensitive to a busy machine)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--override", action="append", default=[],
                 help="extra --config.* flags, e.g. --override=--config.model.base_width=8")
  a = p.parse_args()
  root = tempfile.mkdtemp(prefix="bench_restart_")
  try:
    for label, cache in (("cache", None), ("no cache", "")):
      workdir = os.path.join(root, label.replace(" ", "_"))
      cache_dir = os.path.join(workdir, "compilation_cache") if cache is None else cache
      first, first_cpu = _run(a.config, workdir, a.steps, a.override, cache_dir)
      restart, restart_cpu = _run(a.config, workdir, 2 * a.steps, a.override, cache_dir)
      print(f"{label}: first start {first:.1f} s ({first_cpu:.1f} CPU s), "
            f"restart {restart:.1f} s ({restart_cpu:.1f} CPU s)", flush=True)
      print(json.dumps({"setting": label, "config": a.config, "steps": a.steps,
                        "first_start_s": round(first, 2), "restart_s": round(restart, 2),
                        "first_start_cpu_s": round(first_cpu, 2),
                        "restart_cpu_s": round(restart_cpu, 2)}))
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
