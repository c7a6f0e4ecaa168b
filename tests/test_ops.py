import numpy as np
import torch
import torch.nn.functional as F

from udajax import ops


def test_bilinear_align_corners_matches_torch_up_and_down():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 13, 21, 5)).astype(np.float32)
  for size in [(97, 161), (7, 9), (13, 21), (1, 4)]:
    ours = np.asarray(ops.resize_bilinear_align_corners(x, size))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bilinear",
                        align_corners=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_bilinear_align_corners_hand_values():
  x = np.array([0.0, 10.0, 20.0], np.float32).reshape(1, 1, 3, 1)
  out = np.asarray(ops.resize_bilinear_align_corners(x, (1, 5)))[0, 0, :, 0]
  np.testing.assert_allclose(out, [0, 5, 10, 15, 20])


def test_nearest_matches_torch():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 19, size=(2, 97, 161)).astype(np.int32)
  for size in [(13, 21), (90, 160), (200, 300)]:
    ours = np.asarray(ops.resize_nearest(y, size))
    ref = F.interpolate(torch.from_numpy(y[:, None].astype(np.float32)), size=size,
                        mode="nearest")[:, 0].numpy().astype(np.int32)
    np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(ops.nearest_indices(5, 2), [0, 2])
