"""Evaluates a checkpoint (a udajax workdir or a converted PyTorch checkpoint) on the target set.

    python -m udajax.evaluate --config=configs/gta.py --checkpoint=runs/gta \
        [--config.eval.flip=True] [--config.eval.label_size="(1024,2048)"]

Prints the per-class IoU table, mIoU (and mIoU13 for 16-class runs) and pixel accuracy.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A udajax workdir or a directory written by "
    "data_prep/convert_torch_checkpoint.py.")
_WHICH = flags.DEFINE_enum(
    "which", "best", ["best", "latest"],
    "From a workdir: its best checkpoint by eval score (mIoU, mIoU13 for 16 classes; the latest "
    "if none was scored) or its latest.")


def evaluate_checkpoint(config, checkpoint: str, which: str = "best") -> dict:
  """Returns the eval summary of `checkpoint` under `config.eval`."""
  import flax
  import jax
  from udajax import configuration, trainer
  from udajax import labels as labels_lib
  from udajax import metrics as metrics_lib
  from udajax import train_step as ts

  configuration.validate_config(config)
  with config.unlocked():
    config.init_checkpoint = checkpoint
  trainer.prepare_datasets(config)
  variables = trainer.initial_variables(config, jax.random.PRNGKey(0), require_classifier=True,
                                       which=which)
  rep = flax.jax_utils.replicate(variables)
  p_eval = ts.make_p_eval_step(config)
  summary, _ = trainer.evaluate(config, p_eval, rep["params"], rep.get("batch_stats", {}))
  names = labels_lib.class_names(config.num_classes)
  print(metrics_lib.format_table({checkpoint: summary}, names), flush=True)
  return summary


def main(argv):
  del argv
  from udajax import errors
  try:
    evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value, _WHICH.value)
  except errors.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
