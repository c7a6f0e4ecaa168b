"""Resizing ops with PyTorch's exact sampling semantics (static shapes, jit-friendly).

`jax.image.resize` uses half-pixel centres (and antialiasing when downsampling), which does not
match the reference's `F.interpolate(..., mode="bilinear", align_corners=True)` nor PyTorch's
legacy `mode="nearest"`. These functions reproduce both with static index tables computed in
numpy float32 (the precision PyTorch uses for its scales), applied separably along H and W.
"""

from typing import Tuple

import jax.numpy as jnp
import numpy as np


def _align_corners_table(in_size: int, out_size: int):
  """Indices (i0, i1) and weight of i1 for align_corners=True linear interpolation, like PyTorch."""
  if out_size > 1:
    scale = np.float32(in_size - 1) / np.float32(out_size - 1)
  else:
    scale = np.float32(0.0)
  src = np.arange(out_size, dtype=np.float32) * scale
  i0 = np.floor(src).astype(np.int64)
  i0 = np.minimum(i0, in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, w1


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch legacy nearest: src = min(floor(dst * (in / out)), in - 1), scale in float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def _interp_axis(x, axis: int, out_size: int):
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  i0, i1, w1 = _align_corners_table(in_size, out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w1 = jnp.asarray(w1.reshape(shape), dtype=x.dtype)
  a = jnp.take(x, i0, axis=axis)
  b = jnp.take(x, i1, axis=axis)
  return a + (b - a) * w1


def resize_bilinear_align_corners(x, size: Tuple[int, int]):
  """Bilinear resize with align_corners=True.

  Args:
    x: (B, H, W, C) array.
    size: (out_h, out_w).
  Returns:
    (B, out_h, out_w, C) array, dtype of x; source coordinate = dst * (in - 1) / (out - 1).
  """
  out_h, out_w = size
  x = _interp_axis(x, 1, out_h)
  return _interp_axis(x, 2, out_w)


def resize_nearest(x, size: Tuple[int, int]):
  """PyTorch-nearest resize of the spatial axes 1 and 2 of a (B, H, W[, C]) array."""
  out_h, out_w = size
  if x.shape[1] != out_h:
    x = jnp.take(x, nearest_indices(x.shape[1], out_h), axis=1)
  if x.shape[2] != out_w:
    x = jnp.take(x, nearest_indices(x.shape[2], out_w), axis=2)
  return x
