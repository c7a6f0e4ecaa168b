"""Trains DeepLab-v2 with orthogonal and clustered embeddings for UDA.

    python train.py --config=configs/gta.py [--workdir=runs/gta] [--config.train.lr=1e-4]

Multi-host: launch one process per host with --coordinator_address/--num_processes/--process_id
(or --distributed on a cluster where `jax.distributed.initialize()` finds them itself).
"""

import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Work directory for checkpoints and logs (default: runs/<config name>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with auto-detected settings.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax/TF internals from the log (warnings and errors pass)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/", "/tensorflow/"))


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # imported here so XLA_FLAGS set by a launcher take effect
  if _COORDINATOR.value or _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from udajax import errors
  from udajax import trainer

  config_path = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(config_path.split(":")[0]))[0])
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    trainer.train_and_evaluate(_CONFIG.value, workdir)
  except errors.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
