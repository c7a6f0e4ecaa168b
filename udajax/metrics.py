"""Segmentation metrics: on-device confusion matrix, per-class IoU, mIoU, pixel accuracy.

The confusion matrix is accumulated on device (`confusion_matrix` is jit/pmap friendly, with
`axis_name` it sums over devices); turning it into IoUs and a table happens on the host in numpy.
"""

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred, labels, num_classes: int, *, mask=None, axis_name=None):
  """Counts (label, prediction) pairs.

  Args:
    pred: (B, H, W) int predictions in [0, num_classes).
    labels: (B, H, W) int labels; values outside [0, num_classes) (e.g. 255) are ignored.
    num_classes: C.
    mask: optional (B,) bool; False rows (padding examples) are not counted.
    axis_name: sum over this pmap axis too.
  Returns:
    (C, C) int32 matrix, rows = ground truth, columns = prediction.
  """
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    valid &= mask.reshape((-1,) + (1,) * (labels.ndim - 1))
  index = jnp.where(valid, labels * num_classes + pred.astype(jnp.int32), num_classes * num_classes)
  counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
  cm = counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)
  if axis_name is not None:
    cm = jax.lax.psum(cm, axis_name)
  return cm


def iou_from_confusion(cm) -> np.ndarray:
  """Per-class IoU = TP / (TP + FP + FN); NaN for a class in neither labels nor predictions."""
  cm = np.asarray(cm, np.float64)
  tp = np.diag(cm)
  denom = cm.sum(0) + cm.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, tp / denom, np.nan)


def summarize(cm, class_names: Sequence[str], subsets: Optional[Dict[str, Sequence[int]]] = None):
  """Metrics dict from a confusion matrix.

  Returns {"mIoU", "pixel_accuracy", "IoU/<class>"...} in percent, plus "mIoU<name>" for each
  named subset of class indices (e.g. {"13": SYNTHIA13_OF_16}). mIoU averages the classes that
  occur in the labels or predictions (nanmean), as the reference does.
  """
  cm = np.asarray(cm, np.float64)
  iou = iou_from_confusion(cm)
  total = cm.sum()
  out = {
      "mIoU": 100.0 * float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else 0.0,
      "pixel_accuracy": 100.0 * float(np.trace(cm) / total) if total > 0 else 0.0,
  }
  for name, idx in (subsets or {}).items():
    sub = iou[list(idx)]
    out[f"mIoU{name}"] = 100.0 * float(np.nanmean(sub)) if np.any(~np.isnan(sub)) else 0.0
  for name, v in zip(class_names, iou):
    out[f"IoU/{name}"] = 100.0 * float(v) if not np.isnan(v) else float("nan")
  return out


def format_table(results: Dict[str, Dict[str, float]], class_names: Sequence[str]) -> str:
  """A per-class IoU table with one column per named result (e.g. source-only vs adapted)."""
  cols = list(results)
  width = max(len(c) for c in class_names + ("pixel accuracy",))
  head = " | ".join([f"{'class':<{width}}"] + [f"{c:>12}" for c in cols])
  lines = [head, "-" * len(head)]

  def fmt(v):
    return f"{v:12.1f}" if v == v else f"{'-':>12}"

  for name in class_names:
    lines.append(" | ".join([f"{name:<{width}}"] + [fmt(results[c][f"IoU/{name}"]) for c in cols]))
  lines.append("-" * len(head))
  extra = sorted({k for r in results.values() for k in r if k.startswith("mIoU")})
  for key in extra + ["pixel_accuracy"]:
    label = key.replace("_", " ")
    lines.append(" | ".join([f"{label:<{width}}"]
                            + [fmt(results[c].get(key, float("nan"))) for c in cols]))
  return "\n".join(lines)


def run_columns(result: Dict[str, object], mode: str) -> Dict[str, Dict[str, float]]:
  """`trainer.train_and_evaluate`'s result as `format_table` columns: "source only" and
  "adapted" after a warm-up stage (the result holds "source_only"), else one named `mode`."""
  summary = {k: v for k, v in result.items() if k != "source_only"}
  if "source_only" in result:
    return {"source only": result["source_only"], "adapted": summary}
  return {mode: summary}
