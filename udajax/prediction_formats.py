"""Prediction file formats: Cityscapes label ids, train ids, palette colours, overlays; PNG I/O.

Pure numpy/PIL (no jax, no TensorFlow); `udajax.predict` runs the model and writes these.
`pred` arguments are (H, W) class indices of a 19-class (GTA5) or 16-class (SYNTHIA) model.
"""

import os
from typing import Optional

import numpy as np
from PIL import Image

from udajax import errors
from udajax import labels as labels_lib

FORMATS = ("cityscapes", "trainid", "color", "overlay")
# Weight of the class colour in the `overlay` format (the image gets 1 - OVERLAY_ALPHA).
OVERLAY_ALPHA = 0.5


class PredictInputError(errors.UserError, ValueError):
  """Bad input to `python -m udajax.predict`: an empty glob, an unreadable image, a name clash."""


def _train_id_to_label_id() -> np.ndarray:
  """(19,) uint8: the Cityscapes label id of each train id (inverts CITYSCAPES_ID_TO_TRAIN_ID)."""
  lut = labels_lib.CITYSCAPES_ID_TO_TRAIN_ID
  out = np.zeros((labels_lib.NUM_CITYSCAPES_CLASSES,), np.uint8)
  for train_id in range(labels_lib.NUM_CITYSCAPES_CLASSES):
    (label_id,) = np.flatnonzero(lut == train_id)
    out[train_id] = label_id
  return out


TRAIN_ID_TO_LABEL_ID = _train_id_to_label_id()


def to_train_ids(pred, num_classes: int) -> np.ndarray:
  """(..., H, W) class indices of a 19- or 16-class model -> uint8 Cityscapes train ids 0..18.

  A 16-class model's index i is the train id `labels.SYNTHIA16_TRAIN_IDS[i]`.
  """
  pred = np.asarray(pred)
  if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
    raise ValueError(f"predictions must lie in [0, {num_classes}), "
                     f"got [{pred.min()}, {pred.max()}]")
  if num_classes == labels_lib.NUM_CITYSCAPES_CLASSES:
    return pred.astype(np.uint8)
  if num_classes == len(labels_lib.SYNTHIA16_TRAIN_IDS):
    return np.asarray(labels_lib.SYNTHIA16_TRAIN_IDS, np.uint8)[pred]
  raise ValueError(f"num_classes must be 19 or 16, got {num_classes}")


def to_label_ids(pred, num_classes: int) -> np.ndarray:
  """(..., H, W) class indices -> uint8 Cityscapes label ids (7 road, ..., 33 bicycle)."""
  return TRAIN_ID_TO_LABEL_ID[to_train_ids(pred, num_classes)]


def to_color(pred, num_classes: int) -> np.ndarray:
  """(..., H, W) class indices -> (..., H, W, 3) uint8 RGB in the Cityscapes palette."""
  return labels_lib.PALETTE[to_train_ids(pred, num_classes)]


def overlay(image, pred, num_classes: int, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
  """The palette colours of `pred` blended over `image`.

  Args:
    image: (H, W, 3) uint8 RGB, the size of `pred`.
    pred: (H, W) class indices.
    num_classes: 19 or 16.
    alpha: weight of the colour; the image gets 1 - alpha.
  Returns:
    (H, W, 3) uint8 RGB, round((1 - alpha) * image + alpha * colour).
  """
  image = np.asarray(image)
  if image.shape != np.shape(pred) + (3,):
    raise ValueError(f"image {image.shape} and prediction {np.shape(pred)} sizes differ")
  color = to_color(pred, num_classes).astype(np.float32)
  out = (1.0 - alpha) * image.astype(np.float32) + alpha * color
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render(pred, fmt: str, num_classes: int, image: Optional[np.ndarray] = None) -> np.ndarray:
  """One prediction (H, W) as the array the format `fmt` writes: (H, W) uint8 or (H, W, 3) uint8.

  `image` ((H, W, 3) uint8 RGB) is needed by the "overlay" format only.
  """
  if fmt == "cityscapes":
    return to_label_ids(pred, num_classes)
  if fmt == "trainid":
    return to_train_ids(pred, num_classes)
  if fmt == "color":
    return to_color(pred, num_classes)
  if fmt == "overlay":
    if image is None:
      raise ValueError("the overlay format needs the image")
    return overlay(image, pred, num_classes)
  raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def output_name(file_name) -> str:
  """The PNG name of an image's prediction: its base name with the extension `.png`.

  "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png" ->
  "frankfurt_000000_000294_leftImg8bit.png" (the official evaluator's `<city>_<seq>_<frame>*.png`).
  """
  if isinstance(file_name, bytes):
    file_name = file_name.decode("utf-8")
  base = os.path.basename(str(file_name).replace("\\", "/"))
  stem, _ = os.path.splitext(base)
  if not stem:
    raise PredictInputError(f"cannot name a prediction after the file name {file_name!r}")
  return stem + ".png"


def write_png(path: str, array: np.ndarray) -> None:
  """Writes (H, W) uint8 as an 8-bit grey PNG (mode L) or (H, W, 3) uint8 as RGB."""
  array = np.ascontiguousarray(array, np.uint8)
  Image.fromarray(array).save(path, format="PNG")  # mode L or RGB from the shape
