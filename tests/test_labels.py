import numpy as np

from udajax import labels


def test_cityscapes_lut_maps_listed_ids_and_ignores_rest():
  lut = labels.CITYSCAPES_ID_TO_TRAIN_ID
  assert lut[7] == 0 and lut[26] == 13 and lut[33] == 18
  assert lut[0] == 255 and lut[34] == 255 and lut[255] == 255
  assert sorted(int(v) for v in lut if v != 255) == list(range(19))


def test_synthia_lut_and_16_class_subset():
  lut = labels.SYNTHIA_ID_TO_TRAIN_ID
  assert lut[3] == 0 and lut[1] == 10 and lut[21] == 3 and lut[13] == 255 and lut[1000] == 255
  assert [int(labels.TRAIN_ID_TO_16[t]) for t in labels.SYNTHIA16_TRAIN_IDS] == list(range(16))
  assert labels.TRAIN_ID_TO_16[9] == 255  # terrain is not among the 16
  assert [labels.class_names(16)[i] for i in range(16) if i not in labels.SYNTHIA13_OF_16] == [
      "wall", "fence", "pole"]


def test_colorize():
  out = labels.colorize(np.array([[0, 18, 255]]))
  np.testing.assert_array_equal(out[0], [[128, 64, 128], [119, 11, 32], [0, 0, 0]])
  np.testing.assert_array_equal(labels.colorize(np.array([9]), 16)[0], labels.PALETTE[10])
