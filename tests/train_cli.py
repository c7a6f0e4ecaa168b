"""Helpers for the resilience tests: run `python train.py` as a subprocess on a tiny demo config,
and read back TensorBoard scalars and checkpoints.

Subprocesses inherit the environment pytest set up in conftest.py (4 forced CPU devices, the
persistent JAX compilation cache), so they reuse the compilations of the in-process runs.
"""

import contextlib
import glob
import importlib
import os
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny demo run: 4-channel ResNet stem, 1 block per stage, batch 1 per device, every step logged
# and checkpointed, the centroid EMA on (so its state must survive a restart), only a final eval.
TINY = {
    "model.base_width": 4,
    "train.batch_size_per_device": 1,
    "train.num_steps": 10,
    "train.warmup_source_only_steps": 0,
    "train.log_every_steps": 1,
    "train.checkpoint_every_steps": 1,
    "train.keep_checkpoints": 2,
    "eval.every_steps": 1000,
    "eval.num_images_to_log": 0,
    "eval.embedding_images": 0,  # diagnostics are tested in tests/test_embeddings.py
    "loss.centroid_smoothing": 0.5,
}


_DEMO_DATA = {}


def session_dir(tmp_path_factory) -> str:
  """The test session's base temporary directory, shared by its pytest-xdist workers (each
  worker's own base directory lies below it)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER") and base.name.startswith("popen-"):
    base = base.parent  # the session's directory, above the local workers' own
  return str(base)


@contextlib.contextmanager
def session_lock(tmp_path_factory, name: str):
  """Holds an exclusive file lock `name`.lock in the session's shared directory (one holder
  among the pytest-xdist workers at a time); yields that directory."""
  import fcntl
  base = session_dir(tmp_path_factory)
  with open(os.path.join(base, name + ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield base
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def demo_data_dir(tmp_path_factory) -> str:
  """The demo dataset, built once per test session and shared by all its test modules.

  Under pytest-xdist every worker has its own base temp directory below one shared by the
  session; the dataset goes there, and a file lock lets the first worker build it while the
  others wait (a build costs ~10 s of CPU).
  """
  if "dir" not in _DEMO_DATA:
    from udajax import datasets
    with session_lock(tmp_path_factory, "udajax_demo_data") as base:
      data_dir = os.path.join(base, "udajax_demo_data")
      os.makedirs(data_dir, exist_ok=True)
      datasets.ensure_demo_built(data_dir)
    _DEMO_DATA["dir"] = data_dir
  return _DEMO_DATA["dir"]


def config(data_dir, **overrides):
  """configs/demo.py with TINY and `overrides` ({"train.lr": 1.0} style keys) applied."""
  c = importlib.import_module("configs.demo").get_config()
  c.data_dir = data_dir
  for key, value in {**TINY, **overrides}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def flags(data_dir, workdir, **overrides):
  """The command line equivalent of `config(data_dir, **overrides)`."""
  args = [sys.executable, os.path.join(ROOT, "train.py"),
          "--config=" + os.path.join(ROOT, "configs", "demo.py"),
          f"--workdir={workdir}", f"--config.data_dir={data_dir}"]
  for key, value in {**TINY, **overrides}.items():
    args.append(f"--config.{key}={value}")
  return args


def env(**extra):
  e = dict(os.environ)
  e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  e.update(extra)
  return e


def run(args, timeout=300, cwd=ROOT, **env_extra):
  """Runs a command to completion (in the repository root unless `cwd`); returns
  CompletedProcess with text stdout/stderr."""
  return subprocess.run(args, cwd=cwd, env=env(**env_extra), capture_output=True, text=True,
                        timeout=timeout)


def start(args, log_path, **env_extra):
  """Starts a command in the background with stdout+stderr to `log_path` (kept as `.log_path`)."""
  log = open(log_path, "w")
  proc = subprocess.Popen(args, cwd=ROOT, env=env(**env_extra), stdout=log,
                          stderr=subprocess.STDOUT)
  proc.log_path = log_path
  return proc


def free_port() -> int:
  """A TCP port free on the loopback interface now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_all(procs, timeout):
  """The exit codes of started processes, all within `timeout` s in total; on timeout kills them
  and fails with the end of their logs."""
  deadline = time.time() + timeout
  rcs = []
  for p in procs:
    try:
      rcs.append(p.wait(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      tails = log_tails(procs)
      for q in procs:
        q.kill()
      raise AssertionError(f"not finished within {timeout} s:\n{tails}") from None
  return rcs


def log_tails(procs, lines=25) -> str:
  """The last `lines` lines of each started process's log, for a failure message."""
  out = []
  for i, p in enumerate(procs):
    with open(p.log_path, errors="replace") as f:
      tail = f.read().splitlines()[-lines:]
    state = "running" if p.poll() is None else f"exit code {p.returncode}"
    out.append(f"--- process {i} ({state}), end of {p.log_path}:\n" + "\n".join(tail))
  return "\n".join(out)


def complete_steps(workdir):
  """Steps of `workdir/checkpoints` whose directories carry orbax's commit marker."""
  out = []
  for path in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")):
    name = os.path.basename(path)
    if name.isdigit() and os.path.isfile(os.path.join(path, "commit_success.txt")):
      out.append(int(name))
  return sorted(out)


def wait_for_step(procs, workdir, step, timeout=420):
  """Polls until a complete checkpoint >= `step` exists; fails if one of `procs` (one process
  started by `start` or a list of them) exits first or on timeout, with the end of their logs."""
  procs = procs if isinstance(procs, (list, tuple)) else [procs]
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = complete_steps(workdir)
    if steps and steps[-1] >= step:
      return steps[-1]
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a process exited before checkpoint {step}:\n{log_tails(procs)}")
    time.sleep(0.02)
  raise AssertionError(f"no checkpoint {step} after {timeout} s:\n{log_tails(procs)}")


def scalars(workdir):
  """{tag: {step: [values in file order]}} of every TensorBoard scalar of `workdir`."""
  from tensorboard.backend.event_processing import event_accumulator
  out = {}
  for f in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    acc = event_accumulator.EventAccumulator(f, size_guidance={"tensors": 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      for ev in acc.Tensors(tag):
        arr = np.asarray(__import__("tensorflow").make_ndarray(ev.tensor_proto))
        if arr.ndim == 0 and arr.dtype.kind == "f":
          out.setdefault(tag, {}).setdefault(ev.step, []).append(float(arr))
  return out


def max_rel_error(a, b):
  """max over leaves of max|a - b| / max|a| (trees of numpy arrays with the same structure)."""
  import jax
  worst = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    worst = max(worst, float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-12)))
  return worst
