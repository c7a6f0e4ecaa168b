"""Start-up and barriers of a multi-process run that do not depend on gloo's 30 s deadline.

On the CPU backend, cross-process collectives run on gloo. Gloo connects a group of devices at
that group's first collective and gives up when a process has not arrived within 30 s
("Gloo context initialization failed: ... GetKeyValue() timed out with key: cpu:gloo/..."):
the waiting process raises, and its exit then waits 300 s in `jax.distributed`'s shutdown
barrier for the process that was late. A process starved of CPU on a shared machine, or one
that builds a dataset while the others wait, reached a first collective that late. Once a
group is connected, a later collective (another program over the same devices) waits for a
late process without that deadline (tests/test_multihost_start.py: 40 s late).

`initialize` therefore connects both device groups the run uses (all devices: the pmapped
train and eval steps; one device per process: `multihost_utils.sync_global_devices`, orbax's
barriers, `process_allgather`) right after the processes meet at a barrier of the coordination
service, and `barrier` waits at such a barrier (timeout of our choosing, no collective).
"""

import collections

import jax
from jax._src import distributed as jax_distributed  # the coordination service client
import jax.numpy as jnp
from jax.experimental import multihost_utils

# How long processes wait for each other at `initialize` and by default at `barrier`.
START_TIMEOUT_S = 600

_barrier_calls = collections.Counter()


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """`jax.distributed.initialize` (arguments None: detected on the cluster), then connects the
  device groups of the CPU backend's collectives while all processes are at the same point."""
  # Cross-process collectives of the CPU backend (tests, CPU clusters); GPU/TPU are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  barrier("start", START_TIMEOUT_S)  # also initialises the backend (device topology exchange)
  if jax.default_backend() == "cpu":
    multihost_utils.sync_global_devices("udajax_connect_processes")
    ones = jnp.ones((jax.local_device_count(),), jnp.float32)
    total = jax.pmap(lambda x: jax.lax.psum(x, "devices"), axis_name="devices")(ones)
    jax.block_until_ready(total)


def barrier(name: str, timeout_s: float = START_TIMEOUT_S) -> None:
  """Waits until every process reaches `barrier(name)` (its n-th call with this name meets the
  others' n-th). A coordination service barrier: no device collective, no gloo deadline.
  No-op in a single-process run."""
  if jax.process_count() == 1:
    return
  _barrier_calls[name] += 1
  key = f"udajax/{name}/{_barrier_calls[name]}"
  jax_distributed.global_state.client.wait_at_barrier(key, int(timeout_s * 1000))
