"""One process of tests/test_multihost_start.py: `python tests/late_process.py PORT PROCESS_ID
DELAY_S [--plain] [--late_at=both|psum|allgather]` (2 processes x 2 CPU devices).

After start-up (`udajax.multihost.initialize`, or with --plain only `jax.distributed.initialize`),
process 1 arrives DELAY_S late at its first collective over all devices (a pmapped psum, as the
train and eval steps), then process 0 arrives DELAY_S late at its first collective over one
device per process (`process_allgather`, as orbax's barriers). `--late_at=psum` or
`--late_at=allgather` keeps only that one delay (the test runs one pair of processes for each,
side by side). Prints "waited psum=S allgather=S" (seconds in each first collective) and
"ok <values>", and exits 0 when both collectives returned the right values.
"""

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
import numpy as np  # noqa: E402

from udajax import multihost  # noqa: E402


def main(port, process_id, delay_s, plain, late_at):
  address = f"127.0.0.1:{port}"
  if plain:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=2,
                               process_id=process_id)
  else:
    multihost.initialize(address, 2, process_id)
  if process_id == 1 and late_at in ("both", "psum"):
    time.sleep(delay_s)
  x = np.full((jax.local_device_count(),), process_id + 1.0, np.float32)
  start = time.monotonic()
  total = jax.pmap(lambda v: jax.lax.psum(v * 2, "d"), axis_name="d")(x)
  total = float(total.addressable_shards[0].data[0])
  psum_s = time.monotonic() - start
  if process_id == 0 and late_at in ("both", "allgather"):
    time.sleep(delay_s)
  start = time.monotonic()
  gathered = multihost_utils.process_allgather(np.int64(10 + process_id)).tolist()
  allgather_s = time.monotonic() - start
  multihost.barrier("done")
  # Seconds this process spent in each first collective (waiting for the late one included).
  print(f"waited psum={psum_s:.1f} allgather={allgather_s:.1f}", flush=True)
  print("ok", total, gathered, flush=True)
  assert total == 12.0 and gathered == [10, 11], (total, gathered)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("port", type=int)
  parser.add_argument("process_id", type=int)
  parser.add_argument("delay_s", type=float)
  parser.add_argument("--plain", action="store_true")
  parser.add_argument("--late_at", choices=("both", "psum", "allgather"), default="both")
  a = parser.parse_args()
  main(a.port, a.process_id, a.delay_s, a.plain, a.late_at)
