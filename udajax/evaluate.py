r"""Evaluates a checkpoint (a udajax workdir or a converted PyTorch checkpoint) on the target set.

    python -m udajax.evaluate --config=configs/gta.py --checkpoint=runs/gta \
        [--which=best|latest] [--output_json=PATH] \
        [--config.eval.flip=True] [--config.eval.label_size="(1024,2048)"]

Prints the per-class IoU table, mIoU (and mIoU13 for 16-class runs) and pixel accuracy. With
`--output_json` it also writes them as one flat JSON object: "mIoU", "mIoU13" (16 classes),
"pixel_accuracy", "IoU/<class name>" (percent, as printed; null for a class absent from both
labels and predictions), "num_images" and "step" (the checkpoint's step; null for a converted
checkpoint).
"""

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from udajax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A udajax workdir or a directory written by "
    "data_prep/convert_torch_checkpoint.py.")
_WHICH = flags.DEFINE_enum(
    "which", "best", ["best", "latest"],
    "From a workdir: its best checkpoint by eval score (mIoU, mIoU13 for 16 classes; the latest "
    "if none was scored) or its latest.")
_OUTPUT_JSON = flags.DEFINE_string(
    "output_json", None, "Also write the summary to this file as one flat JSON object.")


def write_json(path: str, result: dict) -> None:
  """Writes a result of `evaluation.evaluate_checkpoint` as JSON (NaN as null)."""
  from udajax import evaluation
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(evaluation.summary_to_json(result), f, indent=1, allow_nan=False)
    f.write("\n")


def main(argv):
  del argv
  from udajax import errors
  config = _CONFIG.value
  if _OUTPUT_JSON.value:  # an unwritable path fails now, not after the evaluation
    try:
      errors.reject_remote_path(_OUTPUT_JSON.value, "--output_json")
    except errors.USER_ERRORS as e:
      cli.fail(str(e))
    try:
      path = os.path.abspath(os.path.expanduser(_OUTPUT_JSON.value))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      open(path, "a").close()
    except OSError as e:
      cli.fail(f"cannot write --output_json {_OUTPUT_JSON.value}: {e}")
  try:  # a bad config value, a missing checkpoint or dataset fails before jax and TensorFlow
    from udajax import configuration
    from udajax import dataset_paths
    configuration.validate_config(config)
    errors.require_checkpoint_dir(_CHECKPOINT.value)
    dataset_paths.require_built(config)
  except errors.USER_ERRORS as e:
    cli.fail(str(e))
  import jax
  from udajax import evaluation
  from udajax import labels
  from udajax import metrics
  try:
    result = evaluation.evaluate_checkpoint(config, _CHECKPOINT.value, _WHICH.value)
  except errors.USER_ERRORS as e:
    cli.fail(str(e))
  if jax.process_index() > 0:
    return
  names = labels.class_names(config.num_classes)
  step = "" if result["step"] is None else f" (step {result['step']})"
  print(f"{_CHECKPOINT.value}{step}: {result['num_images']} images of "
        f"{config.eval.name}/{config.eval.builder_config}:{config.eval.split}")
  print(metrics.format_table({_CHECKPOINT.value: result}, names), flush=True)
  if _OUTPUT_JSON.value:
    write_json(_OUTPUT_JSON.value, result)
    print(f"summary written to {_OUTPUT_JSON.value}", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main, flags_parser=cli.parse_flags)
