"""Preemption latency of `python train.py`: SIGTERM -> checkpoint saved -> process exited.

Each try starts `python train.py --config=configs/demo.py` on a tiny model (base width 4, batch 1
per device, a checkpoint every 5 steps, an eval every 20 steps) in a fresh work directory, waits
until the training loop has committed its first checkpoint, waits a random 0..--max_delay
seconds more (so the signal lands in a train step, a checkpoint save, a log write or an eval),
sends SIGTERM and times:

  saved   the trainer's log line "Preempted: checkpoint saved at step N" (the checkpoint is
          committed and the logs are flushed);
  exited  the process's exit (status 0 expected, with "preempted: stopped at step N").

With --processes=2 the run is 2 processes x 2 CPU devices (jax.distributed on loopback) and the
signal goes to process 1 only, as a scheduler preempting one host would; both must stop at the
same step, and the times are those of the last process.

  python benchmarks/bench_preemption.py [--tries=10] [--processes=1] [--max_delay=6] [--seed=0]
                                        [--root=/tmp/udajax_bench_preemption] [--json=FILE]
                                        [--py_spy=PATH --dump_after=5]

Every try is checked: exit status 0, the step named in the message committed on disk, the same
step on every process. A start that fails before the signal is repeated (--startup_retries) and
reported. The demo dataset and (1 process) an XLA compilation cache are kept under --root, so
only the first try compiles. With --py_spy (a py-spy binary), the Python stacks of a process still
running --dump_after seconds after the signal are written to ROOT/try<i>/stacks<p>.txt: where the
time goes when an exit is slow. Prints one line per try and min / median / max.
"""

import argparse
import glob
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/demo.py made tiny: seconds to compile, well under a second per step on 2 cores.
OVERRIDES = {
    "model.base_width": 4,
    "train.batch_size_per_device": 1,
    "train.num_steps": 100000,
    "train.warmup_source_only_steps": 0,
    "train.log_every_steps": 1,
    "train.checkpoint_every_steps": 5,
    "train.keep_checkpoints": 2,
    "eval.every_steps": 20,
    "eval.num_images_to_log": 0,
}
SAVED = re.compile(r"Preempted: checkpoint saved at step (\d+)")
STOPPED = re.compile(r"preempted: stopped at step (\d+)")


class StartupError(RuntimeError):
  """train.py stopped before its first checkpoint (before any signal was sent)."""


class _Process:
  """One `train.py` process; a thread timestamps every output line as it arrives."""

  def __init__(self, args, env, log_path):
    self.lines = []  # (monotonic time, text)
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
    self.exit_time = None
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append((time.monotonic(), line))
      self.log.write(line)
    self.log.flush()

  def first(self, pattern):
    """(time, match) of the first output line matching `pattern`, or (None, None)."""
    for t, line in list(self.lines):
      m = pattern.search(line)
      if m:
        return t, m
    return None, None

  def text(self):
    return "".join(line for _, line in self.lines)


def _complete_steps(workdir):
  steps = []
  for path in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")):
    name = os.path.basename(path)
    if name.isdigit() and os.path.isfile(os.path.join(path, "commit_success.txt")):
      steps.append(int(name))
  return sorted(steps)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, workdir, data_dir, cache_dir, log_prefix):
  base = [sys.executable, os.path.join(ROOT, "train.py"),
          "--config=" + os.path.join(ROOT, "configs", "demo.py"), f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}"]
  base += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the flag above decides
  if args.processes == 1:
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return [_Process(base, env, f"{log_prefix}0.log")]
  port = _free_port()
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // args.processes}"
  return [_Process(base + [f"--coordinator_address=127.0.0.1:{port}",
                           f"--num_processes={args.processes}", f"--process_id={i}"],
                   env, f"{log_prefix}{i}.log") for i in range(args.processes)]


def _wait_for_checkpoint(procs, workdir, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if _complete_steps(workdir):
      return
    for p in procs:
      if p.proc.poll() is not None:
        raise StartupError(f"train.py exited with {p.proc.returncode} before its first "
                           f"checkpoint:\n{p.text()[-3000:]}")
    time.sleep(0.02)
  raise StartupError(f"no checkpoint after {timeout} s")


def _dump_stacks(py_spy, procs, try_dir):
  for i, p in enumerate(procs):
    if p.proc.poll() is None:
      out = subprocess.run([py_spy, "dump", "--pid", str(p.proc.pid)], capture_output=True,
                           text=True, timeout=60)
      with open(os.path.join(try_dir, f"stacks{i}.txt"), "w") as f:
        f.write(out.stdout + out.stderr)


def one_try(args, index, rng, data_dir, cache_dir):
  """Runs one SIGTERM try; returns its result dict (raises if the run misbehaved)."""
  try_dir = os.path.join(args.root, f"try{index}")
  subprocess.run(["rm", "-rf", try_dir], check=True)
  os.makedirs(try_dir)
  workdir = os.path.join(try_dir, "work")
  procs = _launch(args, workdir, data_dir, cache_dir, os.path.join(try_dir, "process"))
  try:
    _wait_for_checkpoint(procs, workdir, args.start_timeout)
    delay = rng.uniform(0, args.max_delay)
    time.sleep(delay)
    if any(p.proc.poll() is not None for p in procs):
      raise RuntimeError("train.py exited before the signal")
    signalled = procs[-1]
    sent = time.monotonic()
    signalled.proc.send_signal(signal.SIGTERM)
    dumped = False
    for p in procs:
      while True:
        try:
          p.proc.wait(timeout=0.01)
          break
        except subprocess.TimeoutExpired:
          now = time.monotonic() - sent
          if args.py_spy and not dumped and now > args.dump_after:
            _dump_stacks(args.py_spy, procs, try_dir)
            dumped = True
          if now > args.exit_timeout:
            raise RuntimeError(f"process {procs.index(p)} still running {now:.0f} s after SIGTERM")
      p.exit_time = time.monotonic()
  finally:
    for p in procs:
      if p.proc.poll() is None:
        p.proc.kill()
        p.proc.wait()
      p._reader.join(timeout=10)
  rcs = [p.proc.returncode for p in procs]
  texts = [p.text() for p in procs]
  if rcs != [0] * len(procs):
    raise RuntimeError(f"exit statuses {rcs}:\n" + "\n".join(t[-2000:] for t in texts))
  stops = [int(STOPPED.search(t).group(1)) for t in texts]
  if len(set(stops)) != 1 or stops[0] not in _complete_steps(workdir):
    raise RuntimeError(f"stopped at {stops}, committed steps {_complete_steps(workdir)}")
  saved = [p.first(SAVED)[0] for p in procs]
  return {"try": index, "delay_s": round(delay, 3), "step": stops[0],
          "saved_s": round(max(saved) - sent, 3),
          "exited_s": round(max(p.exit_time for p in procs) - sent, 3)}


def _machine():
  cpu = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    cpu = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
    if " avx512f" in info:
      cpu += ", AVX-512"
    elif " avx2" in info:
      cpu += ", AVX2"
  except (OSError, AttributeError):
    pass
  return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tries", type=int, default=10)
  p.add_argument("--processes", type=int, default=1, choices=(1, 2, 4))
  p.add_argument("--max_delay", type=float, default=6.0,
                 help="seconds after the first checkpoint, uniform")
  p.add_argument("--seed", type=int, default=0, help="seeds the random delays")
  p.add_argument("--root", default="/tmp/udajax_bench_preemption")
  p.add_argument("--start_timeout", type=float, default=600.0)
  p.add_argument("--exit_timeout", type=float, default=120.0,
                 help="a try fails when a process runs this long after the signal")
  p.add_argument("--compilation_cache", default="auto", choices=("auto", "on", "off"),
                 help="XLA compilation cache under --root: auto = on for 1 process, off for "
                      "several (with it on, 2 of 3 two-process starts here aborted at the first "
                      "cross-process collective: gloo gave up after 30 s waiting for the other "
                      "process)")
  p.add_argument("--startup_retries", type=int, default=3,
                 help="tries that fail before the signal (e.g. a collective timing out while "
                      "another process still compiles) are repeated up to this many times")
  p.add_argument("--json", default=None, help="also write the results to this file")
  p.add_argument("--py_spy", default=None, help="py-spy binary: dump slow exits' stacks")
  p.add_argument("--dump_after", type=float, default=5.0)
  args = p.parse_args()

  os.makedirs(args.root, exist_ok=True)
  data_dir = os.path.join(args.root, "tfds")
  use_cache = (args.compilation_cache == "on"
               or (args.compilation_cache == "auto" and args.processes == 1))
  cache_dir = os.path.join(args.root, "compilation_cache") if use_cache else ""
  sys.path.insert(0, ROOT)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from udajax import datasets  # pylint: disable=g-import-not-at-top
  datasets.ensure_demo_built(data_dir)

  print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {_machine()}; load average "
        f"{os.getloadavg()[0]:.1f}; {args.processes} process(es), {args.tries} tries, "
        f"delays U(0, {args.max_delay}) s after the first checkpoint, seed {args.seed}", flush=True)
  rng = random.Random(args.seed)
  results, startup_failures = [], []
  for i in range(args.tries):
    while True:
      try:
        r = one_try(args, i, rng, data_dir, cache_dir)
        break
      except StartupError as e:
        startup_failures.append(str(e).splitlines()[0])
        print(f"try {i}: failed before the signal, repeated ({startup_failures[-1]})", flush=True)
        if len(startup_failures) > args.startup_retries:
          raise
    results.append(r)
    print(f"try {i}: SIGTERM {r['delay_s']:.2f} s after the first checkpoint; stopped at step "
          f"{r['step']}; saved {r['saved_s']:.2f} s, exited {r['exited_s']:.2f} s after the "
          "signal", flush=True)
  summary = {}
  for key in ("saved_s", "exited_s"):
    values = [r[key] for r in results]
    summary[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    print(f"{key[:-2]}: min {min(values):.2f} s, median {statistics.median(values):.2f} s, "
          f"max {max(values):.2f} s over {len(values)} tries")
  if startup_failures:
    print(f"{len(startup_failures)} start(s) failed before the signal and were repeated")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": _machine(), "processes": args.processes, "tries": results,
                 "summary": summary, "startup_failures": startup_failures, "argv": sys.argv},
                f, indent=1)


if __name__ == "__main__":
  main()
