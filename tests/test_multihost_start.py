"""Multi-process start-up on CPU (2 processes x 2 devices, jax.distributed on loopback):
processes that reach their first collectives far apart still meet there.

Gloo, the CPU backend's cross-process transport, connects a device group at the group's first
collective and fails after 30 s without every process ("Gloo context initialization failed");
the failing process then hung 300 s in jax.distributed's shutdown. `udajax.multihost.initialize`
connects both groups the trainer uses at start, so here two pairs of processes run side by side:
in one, a process is 40 s late at the first psum over all devices; in the other, a process is
40 s late at the first `process_allgather` (one device per process); all four finish. With only
`jax.distributed.initialize` (`python tests/late_process.py PORT ID 33 --plain`, both delays),
the first collective failed that way and neither process had exited 200 s later.

The four processes mostly sleep, so they are started when the test is collected
(`start_early`, called by tests/conftest.py: once per test session, by whichever pytest-xdist
worker gets there first) and run beside the other tests; the test, ordered last, then waits for
their exit codes. Each runs under `timeout` (coreutils), so a hung process ends within
`DEADLINE_S` even if the test never runs.
"""

import os
import re
import sys
import time

from tests import train_cli

# Beyond gloo's 30 s connection deadline, with room for the on-time process's own start-up
# (it compiles its collective before it waits there).
LATE_S = 40
# Seconds each process may run (start-up, the 40 s delay, exit) before `timeout` kills it.
DEADLINE_S = 240
_PROCESSES = [(late_at, pid) for late_at in ("psum", "allgather") for pid in range(2)]
# The process of each pair that waits at the collective its partner is late for.
_ON_TIME = {"psum": 0, "allgather": 1}


def _directory(tmp_path_factory) -> str:
  return os.path.join(train_cli.session_dir(tmp_path_factory), "late_processes")


def _start(directory: str) -> None:
  """Starts both pairs of processes, logs and exit-code files in `directory`."""
  script = os.path.join(train_cli.ROOT, "tests", "late_process.py")
  ports = set()
  for late_at, pid in _PROCESSES:
    if pid == 0:
      port = train_cli.free_port()
      while port in ports:  # the first pair's coordinator may not be listening yet
        port = train_cli.free_port()
      ports.add(port)
    stem = os.path.join(directory, f"{late_at}{pid}")
    # The shell records the exit code once python has exited (shutdown included); the rename
    # makes the file appear complete.
    train_cli.start(["sh", "-c", f'timeout -k 5 {DEADLINE_S} "$@"; echo $? > "{stem}.rc.tmp" && '
                     f'mv "{stem}.rc.tmp" "{stem}.rc"', "sh",
                     sys.executable, script, str(port), str(pid), str(LATE_S),
                     f"--late_at={late_at}"], stem + ".log")


def start_early(tmp_path_factory) -> None:
  """Starts the processes unless this test session already did (a file lock between workers)."""
  directory = _directory(tmp_path_factory)
  with train_cli.session_lock(tmp_path_factory, "late_processes"):
    started = os.path.join(directory, "started")
    if not os.path.exists(started):
      os.makedirs(directory, exist_ok=True)
      _start(directory)
      with open(started, "w") as f:
        f.write(f"{time.time()}\n")


def test_late_processes_meet_at_first_collectives(tmp_path_factory):
  start_early(tmp_path_factory)  # a no-op where collection already started them
  directory = _directory(tmp_path_factory)
  with open(os.path.join(directory, "started")) as f:
    deadline = float(f.read()) + DEADLINE_S + 10
  stems = [os.path.join(directory, f"{late_at}{pid}") for late_at, pid in _PROCESSES]

  def log(stem):
    try:
      with open(stem + ".log", errors="replace") as f:
        return f.read()
    except FileNotFoundError:
      return "(no log: the process was not started)"

  def tails():
    return "\n".join(f"--- {stem}.log:\n" + "\n".join(log(stem).splitlines()[-25:])
                     for stem in stems)

  while not all(os.path.exists(s + ".rc") for s in stems):
    assert time.time() < deadline, f"not finished within {DEADLINE_S} s:\n{tails()}"
    time.sleep(0.2)
  rcs = []
  for stem in stems:
    with open(stem + ".rc") as f:
      rcs.append(f.read().strip())
  assert rcs == ["0"] * 4, f"exit codes {rcs} (124: killed by timeout)\n{tails()}"
  for stem in stems:
    assert "ok 12.0 [10, 11]" in log(stem), tails()
  # The on-time process of each pair waited beyond gloo's 30 s connection deadline at the
  # collective its partner was late for (so the test ran the case it is about).
  for collective, pid in _ON_TIME.items():
    stem = os.path.join(directory, f"{collective}{pid}")
    waited = float(re.search(rf"waited .*{collective}=([0-9.]+)", log(stem)).group(1))
    assert waited > 30, (stem, collective, waited, tails())
