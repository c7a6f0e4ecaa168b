"""Stopping on SIGTERM (preemption): poll a flag after every step, save, raise `Preempted`."""

import signal
import threading

import jax
import orbax.checkpoint as ocp


class Preempted(Exception):
  """Training stopped early on SIGTERM (or a multi-host preemption notice) after saving a
  checkpoint at `step`; restarting the same command resumes from it."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: stopped at step {step} after saving a checkpoint in {directory}; "
                     "run the same command again to resume")
    self.step = step
    self.directory = directory


class PreemptionNotice:
  """Turns SIGTERM into a flag that the training loop polls after every step (a context manager).

  Single process: a Python signal handler (installed from the main thread only). With
  `jax.distributed` initialised, JAX's preemption sync manager already listens for SIGTERM and
  agrees a common step with every process (`CheckpointManager.reached_preemption`), so no
  handler is installed: replacing JAX's would break that agreement.
  """

  def __init__(self):
    self.signum = None
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
    """True when training should save and stop after `step` (call at every step, all processes)."""
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self.signum is not None
