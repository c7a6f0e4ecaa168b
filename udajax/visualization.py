"""Image summaries for the metric logs: input | label | prediction panels, colourised."""

import numpy as np

from udajax import labels as labels_lib
from udajax.images import denormalize


def summary_panels(images, labels, preds, num_classes: int) -> np.ndarray:
  """Side-by-side panels [input | label | prediction].

  Args:
    images: (N, H, W, 3) normalised images. labels, preds: (N, H, W) ints (255 = ignore, black).
  Returns:
    (N, H, 3W, 3) uint8 RGB.
  """
  rgb = denormalize(images)
  lab = labels_lib.colorize(labels, num_classes)
  pred = labels_lib.colorize(preds, num_classes)
  if lab.shape[1:3] != rgb.shape[1:3]:  # full-resolution labels: show at the image size
    ys = np.arange(rgb.shape[1]) * lab.shape[1] // rgb.shape[1]
    xs = np.arange(rgb.shape[2]) * lab.shape[2] // rgb.shape[2]
    lab = lab[:, ys][:, :, xs]
    pred = pred[:, ys][:, :, xs]
  return np.concatenate([rgb, lab, pred], axis=2)
