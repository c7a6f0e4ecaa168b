"""The reference's input normalisation ("numpy transform") and its inverse, in numpy.

Network inputs are float32 **BGR** images with the per-channel mean subtracted and no scaling:
`normalize(rgb_uint8)`. `denormalize` turns them back into RGB uint8 for pictures.
"""

import numpy as np

# Mean of the reference's "numpy transform", in B, G, R order (pixel values 0..255).
IMAGE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], dtype=np.float32)


def normalize(images) -> np.ndarray:
  """RGB uint8 images (..., H, W, 3) -> float32 BGR minus IMAGE_MEAN_BGR, no scaling."""
  x = np.asarray(images)
  if x.shape[-1] != 3:
    raise ValueError(f"normalize expects (..., H, W, 3) RGB images, got shape {x.shape}")
  return x.astype(np.float32)[..., ::-1] - IMAGE_MEAN_BGR


def denormalize(images) -> np.ndarray:
  """(..., H, W, 3) normalised BGR float -> RGB uint8 (rounded, clipped to [0, 255])."""
  bgr = np.asarray(images, np.float32) + IMAGE_MEAN_BGR
  return np.clip(np.round(bgr[..., ::-1]), 0, 255).astype(np.uint8)
