import jax
import numpy as np

from udajax import metrics


def test_confusion_matrix_hand_values_ignore_and_mask():
  labels = np.array([[[0, 1], [2, 255]], [[1, 1], [1, 1]]])
  pred = np.array([[[0, 2], [2, 1]], [[0, 0], [0, 0]]])
  cm = np.asarray(metrics.confusion_matrix(pred, labels, 3))
  np.testing.assert_array_equal(cm, [[1, 0, 0], [4, 0, 1], [0, 0, 1]])
  cm = np.asarray(metrics.confusion_matrix(pred, labels, 3, mask=np.array([True, False])))
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 1], [0, 0, 1]])


def test_iou_and_summary():
  cm = np.array([[1, 0, 0], [4, 0, 1], [0, 0, 1]])
  iou = metrics.iou_from_confusion(cm)
  np.testing.assert_allclose(iou, [1 / 5, 0 / 5, 1 / 2])
  s = metrics.summarize(cm, ("a", "b", "c"), {"2": (0, 2)})
  np.testing.assert_allclose(s["mIoU"], 100 * (0.2 + 0 + 0.5) / 3)
  np.testing.assert_allclose(s["mIoU2"], 100 * (0.2 + 0.5) / 2)
  np.testing.assert_allclose(s["pixel_accuracy"], 100 * 2 / 7)
  absent = metrics.summarize(np.diag([3, 0]), ("a", "b"))
  assert absent["mIoU"] == 100.0 and np.isnan(absent["IoU/b"])
  table = metrics.format_table({"source only": s, "adapted": s}, ("a", "b", "c"))
  assert "source only" in table and "mIoU2" in table and "20.0" in table


def test_confusion_matrix_psum_over_devices():
  n = jax.local_device_count()
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=(n, 2, 5, 5))
  pred = rng.integers(0, 4, size=(n, 2, 5, 5))
  f = jax.pmap(lambda p, y: metrics.confusion_matrix(p, y, 4, axis_name="d"), axis_name="d")
  out = np.asarray(f(pred, labels))
  single = np.asarray(metrics.confusion_matrix(pred.reshape(-1, 5, 5), labels.reshape(-1, 5, 5), 4))
  for d in range(n):
    np.testing.assert_array_equal(out[d], single)
