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
"""

import os
import sys

from tests import train_cli

# Beyond gloo's 30 s connection deadline, with room for the on-time process's own start-up
# (it compiles its collective before it waits there).
LATE_S = 40


def test_late_processes_meet_at_first_collectives(tmp_path):
  script = os.path.join(train_cli.ROOT, "tests", "late_process.py")
  procs, ports = [], set()
  for late_at in ("psum", "allgather"):  # one pair of processes each, side by side
    port = train_cli.free_port()
    while port in ports:  # the first pair's coordinator may not be listening yet
      port = train_cli.free_port()
    ports.add(port)
    procs += [train_cli.start([sys.executable, script, str(port), str(pid), str(LATE_S),
                               f"--late_at={late_at}"], str(tmp_path / f"{late_at}{pid}.log"))
              for pid in range(2)]
  rcs = train_cli.wait_all(procs, 240)
  assert rcs == [0, 0, 0, 0], train_cli.log_tails(procs)
  for p in procs:
    with open(p.log_path) as f:
      assert "ok 12.0 [10, 11]" in f.read()
