"""Trains DeepLab-v2 with orthogonal and clustered embeddings for UDA.

    python train.py --config=configs/gta.py [--workdir=runs/gta] [--config.train.lr=1e-4]

Multi-host: launch one process per host with --coordinator_address/--num_processes/--process_id
(or --distributed on a cluster where `jax.distributed.initialize()` finds them itself).

Exit status: 0 when training finished or was preempted (SIGTERM: the current step finishes, a
checkpoint is saved; run the same command again to resume), 2 on a user error (bad flag or config
key, missing data or checkpoint, divergence), printed as one `error: ...` line without traceback.
"""

import difflib
import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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


def _flag_error(argv, e) -> str:
  """One line for a command-line parse failure, naming an unknown `--config.*` key if any."""
  from udajax import configuration  # light: no jax/TF
  schema = configuration.base_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node, done = schema, []
    for key in path:
      if not hasattr(node, "keys") or key not in node:
        known = list(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean '{'.'.join(done + close)}'? " if close else ""
        where = ".".join(done) or "the top level"
        return (f"config key '{'.'.join(path)}' is unknown ({arg}): {hint}"
                f"known keys of {where}: {', '.join(sorted(known))}")
      node, done = node[key], done + [key]
  text = " ".join(str(e).replace("\\n", " ").split())
  if "cannot be added since the config is locked" in text:  # a typo inside the config file
    files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    return f"cannot load config file {files[0] if files else '?'} ({type(e).__name__}): {text}"
  return f"bad command line ({type(e).__name__}): {text}; see python train.py --help"


def _parse_flags(argv):
  """absl flag parsing that reports a bad flag, config file or override as one line (exit 2)."""
  try:
    args = flags.FLAGS(argv)
  except Exception as e:  # absl / ml_collections raise several types (AttributeError, KeyError...)
    if "--config must have a value" in str(e):
      message = "--config is required, e.g. python train.py --config=configs/demo.py"
    else:
      message = _flag_error(argv, e)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
  try:
    _CONFIG.value.keys()  # ml_collections defers a config file's load error to the first access
  except Exception as e:
    cause = e.__cause__ or e
    print(f"error: cannot load config file {flags.FLAGS['config'].config_filename} "
          f"({type(cause).__name__}: {' '.join(str(cause).split())}): check the path and that it "
          "defines get_config()", file=sys.stderr, flush=True)
    sys.exit(2)
  return args


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # imported here so XLA_FLAGS set by a launcher take effect
  if _COORDINATOR.value or _DISTRIBUTED.value:
    # Cross-process collectives of the CPU backend (tests, CPU clusters); GPU/TPU are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from udajax import errors
  from udajax import preemption
  from udajax import trainer

  config = _CONFIG.value
  config_path = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_path.split(":")[0]))[0])
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _fail(f"--workdir={workdir} is a file, not a directory: choose another work directory")
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
    _fail(str(e))
  if jax.process_index() == 0:
    print(_result_table(config, workdir, result), flush=True)
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def _fail(message: str) -> None:
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(2)


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
    # Seen on CPU clusters: a process that hits the cache reaches the first cross-process (gloo)
    # collective more than gloo's 30 s deadline before one that compiles, and aborts.
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
  app.run(main, flags_parser=_parse_flags)
