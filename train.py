"""Trains DeepLab-v2 with orthogonal and clustered embeddings for UDA.

    python train.py --config=configs/gta.py [--workdir=runs/gta] [--config.train.lr=1e-4]

Multi-host: launch one process per host with --coordinator_address/--num_processes/--process_id
(or --distributed on a cluster where `jax.distributed.initialize()` finds them itself).

Exit status: 0 when training finished or was preempted (SIGTERM: the current step finishes, a
checkpoint is saved; run the same command again to resume), 2 on a user error (bad flag or config
key, missing data or checkpoint, divergence), printed as one `error: ...` line without traceback.
"""

import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from udajax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Work directory for checkpoints and logs (default: runs/<config name>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with auto-detected settings.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Persistent XLA compilation cache (default WORKDIR/compilation_cache; '' disables).")


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax/TF internals from the log (warnings and errors pass)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/", "/tensorflow/"))


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  config_path = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_path.split(":")[0]))[0])
  if os.path.exists(workdir) and not os.path.isdir(workdir):  # before the slow imports below
    cli.fail(f"--workdir={workdir} is a file, not a directory: choose another work directory")
  from udajax import errors  # imports nothing else
  try:
    errors.reject_remote_path(workdir, "--workdir")
    # A bad config value or a dataset that is not built fails before jax and TensorFlow load.
    from udajax import configuration
    from udajax import dataset_paths
    configuration.validate_config(config)
    dataset_paths.require_built(config, dataset_paths.run_domains(config))
  except errors.UserError as e:
    cli.fail(str(e))
  import jax  # imported here so XLA_FLAGS set by a launcher take effect
  if _COORDINATOR.value or _DISTRIBUTED.value:
    from udajax import multihost
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from udajax import preemption
  from udajax import trainer

  _enable_compilation_cache(workdir)
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    result = trainer.train_and_evaluate(config, workdir)
  except preemption.Preempted as e:
    _exit_now(str(e), 0)  # inside the except clause: see _exit_now
  except errors.TrainingDiverged as e:
    _exit_now(f"error: {e}", 2)
  except errors.USER_ERRORS as e:
    cli.fail(str(e))
  if jax.process_index() == 0:
    print(_result_table(config, workdir, result), flush=True)
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def _enable_compilation_cache(workdir: str) -> None:
  """Persistent XLA compilation cache, so a restarted job (preemption, resume) skips compiling.

  `--compilation_cache_dir` (default WORKDIR/compilation_cache; "" disables); a cache already
  configured through $JAX_COMPILATION_CACHE_DIR is kept.
  """
  import jax
  path = _COMPILATION_CACHE.value
  if path is None:
    path = os.path.join(workdir, "compilation_cache")
  if not path or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    # Kept off: a process that hit the cache reached the first cross-process (gloo) collective
    # more than gloo's 30 s deadline before one that compiled, and aborted. `multihost.initialize`
    # now connects the gloo groups at start, which removes that deadline, but a shared cache
    # across processes has not been tested since.
    logging.info("compilation cache off: multi-process CPU run")
    return
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _result_table(config, workdir: str, result: dict) -> str:
  """The final target IoU table (source-only and adapted columns after a warm-up stage)."""
  from udajax import labels, metrics
  table = metrics.format_table(metrics.run_columns(result, config.train.mode),
                               labels.class_names(config.num_classes))
  steps = config.train.stop_step or config.train.num_steps
  e = config.eval
  return (f"\nTarget evaluation ({e.name}/{e.builder_config}:{e.split}) after {steps} steps, "
          f"workdir {os.path.abspath(workdir)}:\n{table}\n")


def _exit_now(message: str, status: int) -> None:
  """Exits now: checkpoints are committed, logs flushed (status 0: preempted, 2: diverged).

  Called inside the `except` clause, while the exception's traceback still holds the training
  frames: once the clause ends, those frames are freed and the still-running tf.data input
  pipeline (a parallel map calling Python) is torn down, which took up to ~30 s on 2 cores
  (measured with benchmarks/bench_preemption.py), longer than a scheduler's grace period before
  SIGKILL. Nothing is left to save, so the interpreter's cleanup is skipped (os._exit).
  """
  import jax
  print(message, file=sys.stderr, flush=True)
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
