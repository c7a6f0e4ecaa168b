"""Evaluation on the target set: confusion matrix on device, per-class IoU, mIoU, pixel accuracy.

`evaluate` runs a pmapped eval step (`train_step.make_p_eval_step`) over `data.eval_batches` and
is shared by the trainer's periodic evaluation and `python -m udajax.evaluate`; prediction
(`python -m udajax.predict`) runs the same step through `eval_outputs`, or, for image files
without labels, `make_p_predict_step` (the same forward: `train_step.predict_logits` + argmax);
`load_checkpoint_variables` reads the model of a work directory or a converted checkpoint.
"""

import copy
import math
from typing import Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from udajax import checkpoints
from udajax import configuration
from udajax import data
from udajax import errors
from udajax import labels as labels_lib
from udajax import metrics as metrics_lib
from udajax import train_step as ts
from udajax import visualization

EVAL_KEYS = ("image", "label", "mask")  # the eval batch entries the device step takes


def selection_metric(num_classes: int) -> str:
  """The eval metric that picks the best checkpoint: mIoU, or mIoU13 for 16-class (SYNTHIA) runs,
  as the reference selects and the paper reports."""
  return "mIoU13" if num_classes == 16 else "mIoU"


def class_subsets(num_classes: int) -> Dict[str, tuple]:
  """Extra mean IoUs to report: mIoU13 (the 16 classes without wall, fence, pole) for SYNTHIA."""
  return {"13": labels_lib.SYNTHIA13_OF_16} if num_classes == 16 else {}


def eval_outputs(config, p_eval_step, params,
                 batch_stats) -> Iterator[Tuple[dict, np.ndarray, jax.Array]]:
  """Runs the eval step over this process's eval batches (`data.eval_batches`).

  Yields (batch, cm, pred) per batch: the batch as read (with "mask" and "file_name"), its
  confusion matrix (C, C) int64 summed over all devices, and the predictions
  (D, B, Hl, Wl) int32 at the label size (on device; `np.asarray` fetches them).
  """
  for batch in data.eval_batches(config):
    batch_cm, pred = p_eval_step(params, batch_stats, {k: batch[k] for k in EVAL_KEYS})
    # Each batch's matrix is counted on device (int32, summed over devices); running totals
    # are int64 on the host: full-resolution sets exceed 2^31 pixels of one class.
    yield batch, np.asarray(jax.device_get(batch_cm[0]), np.int64), pred


def summarize(config, cm) -> Dict[str, float]:
  """The summary of a confusion matrix for `config.num_classes` (see `metrics.summarize`)."""
  return metrics_lib.summarize(cm, labels_lib.class_names(config.num_classes),
                               class_subsets(config.num_classes))


def _run(config, p_eval_step, params, batch_stats, num_images: int = 0):
  """(confusion matrix (C, C) int64, images counted on this process, panels or None)."""
  total = None
  panels = None
  count = 0
  for batch, batch_cm, pred in eval_outputs(config, p_eval_step, params, batch_stats):
    total = batch_cm if total is None else total + batch_cm
    count += int(np.sum(batch["mask"]))
    if panels is None and num_images > 0:
      def take(x):
        return np.asarray(x).reshape((-1,) + np.shape(x)[2:])[:num_images]
      panels = visualization.summary_panels(take(batch["image"]), take(batch["label"]),
                                            take(pred), config.num_classes)
  if total is None:
    e = config.eval
    raise ValueError(f"eval split {e.name}/{e.builder_config}:{e.split} is empty")
  return total, count, panels


def evaluate(config, p_eval_step, params, batch_stats, *,
             num_images: int = 0) -> Tuple[Dict[str, float], Optional[np.ndarray]]:
  """Runs the eval set of `config.eval` with replicated `params`/`batch_stats`.

  Returns (summary, panels): summary maps "mIoU", "pixel_accuracy", "IoU/<class>" (and "mIoU13"
  for 16 classes) to percentages (see `metrics.summarize`); panels are `num_images`
  input | label | prediction pictures (N, H, 3W, 3) uint8 of the first batch, or None.
  """
  cm, _, panels = _run(config, p_eval_step, params, batch_stats, num_images)
  return summarize(config, cm), panels


def make_p_predict_step(config, devices=None):
  """The eval step's forward without labels, pmapped over `devices` (default: all local ones).

  Returns f(params, batch_stats, images, out_size) -> (D, B, h, w) int32 class indices: argmax of
  `train_step.predict_logits` (flip test-time augmentation when `config.eval.flip`) with the
  logits upsampled (align corners) to `out_size` = (h, w), a static argument. `params` and
  `batch_stats` replicated, images (D, B, H, W, 3) normalised.
  """
  model = ts.create_model(config, axis_name=None)

  def step(params, batch_stats, images, out_size):
    logits = ts.predict_logits(model, {"params": params, "batch_stats": batch_stats}, images,
                               flip=config.eval.flip, out_size=out_size)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return jax.pmap(step, static_broadcasted_argnums=(3,),
                  devices=devices or jax.local_devices())


def load_checkpoint_variables(config, checkpoint: str, which: str = "best"):
  """The trained model of `checkpoint` for `config`: (variables, step).

  `checkpoint`: a udajax work directory (its `which` = "best" or "latest" checkpoint; `step` is
  that checkpoint's step) or a directory written by `data_prep/convert_torch_checkpoint.py`
  (`step` None). Raises CheckpointError when it is missing, has no classifier head (a backbone
  initialisation) or does not fit the configured model.
  """
  step = None
  if checkpoints.is_workdir(checkpoint):
    step = checkpoints.workdir_step(checkpoint, which)
  config = copy.deepcopy(config)  # the caller's config is left as it is
  config.init_checkpoint = checkpoint
  variables = checkpoints.initial_variables(config, jax.random.PRNGKey(0),
                                            require_classifier=True, which=which)
  return variables, step


def evaluate_checkpoint(config, checkpoint: str, which: str = "best") -> Dict[str, float]:
  """Evaluates `checkpoint` on `config.eval`.

  Returns the summary (see `evaluate`: "mIoU", "mIoU13" for 16 classes, "pixel_accuracy",
  "IoU/<class>", in percent, NaN for a class absent from labels and predictions) plus
  "num_images" (images evaluated, all processes) and "step" (the checkpoint's step; None for a
  converted checkpoint).
  """
  configuration.validate_config(config)
  errors.require_checkpoint_dir(checkpoint)
  data.prepare_datasets(config, training=False)
  variables, step = load_checkpoint_variables(config, checkpoint, which)
  replicated = ts.replicate(variables)
  cm, count, _ = _run(config, ts.make_p_eval_step(config), replicated["params"],
                      replicated.get("batch_stats", {}))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    count = int(np.sum(multihost_utils.process_allgather(np.int64(count))))
  return {**summarize(config, cm), "num_images": count, "step": step}


def summary_to_json(result: Dict[str, float]) -> dict:
  """A result of `evaluate_checkpoint` with NaN as None (JSON null), numbers as Python floats."""
  def convert(v):
    if v is None or isinstance(v, (int, np.integer)):
      return v if v is None else int(v)
    v = float(v)
    return None if math.isnan(v) else v
  return {k: convert(v) for k, v in result.items()}
