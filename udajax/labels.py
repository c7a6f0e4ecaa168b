"""Label spaces: Cityscapes train ids, per-dataset id maps, class subsets, palette.

Everything here is plain numpy so it can be used from data building, training and
visualisation alike. Labels are stored as Cityscapes *train ids* (0..18) with 255 = ignore.
"""

import numpy as np

IGNORE_LABEL = 255

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)
NUM_CITYSCAPES_CLASSES = len(CITYSCAPES_CLASSES)  # 19

# RGB colour of each train id (Cityscapes palette).
PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)

# Cityscapes / GTA5 label id -> train id.
_CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# SYNTHIA (RAND-CITYSCAPES) class id -> train id.
_SYNTHIA_ID_TO_TRAIN_ID = {
    1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18,
    12: 17, 15: 6, 16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3,
}


def _lut(mapping, size=256):
  lut = np.full((size,), IGNORE_LABEL, dtype=np.uint8)
  for k, v in mapping.items():
    lut[k] = v
  return lut


# Lookup tables: `train_ids = LUT[raw_ids]`.
CITYSCAPES_ID_TO_TRAIN_ID = _lut(_CITYSCAPES_ID_TO_TRAIN_ID)
# SYNTHIA labels are 16-bit; class ids beyond 255 never occur but must map to ignore.
SYNTHIA_ID_TO_TRAIN_ID = _lut(_SYNTHIA_ID_TO_TRAIN_ID, size=65536)

# The 16-class (SYNTHIA) experiments keep these train ids, renumbered 0..15.
SYNTHIA16_TRAIN_IDS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
TRAIN_ID_TO_16 = _lut({t: i for i, t in enumerate(SYNTHIA16_TRAIN_IDS)})
# The 13-class mIoU drops wall, fence and pole: indices into the 16 classes.
SYNTHIA13_OF_16 = tuple(
    i for i, t in enumerate(SYNTHIA16_TRAIN_IDS)
    if CITYSCAPES_CLASSES[t] not in ("wall", "fence", "pole")
)


def class_names(num_classes: int) -> tuple:
  """Names of the classes of a 19- or 16-class experiment, in label order."""
  if num_classes == NUM_CITYSCAPES_CLASSES:
    return CITYSCAPES_CLASSES
  if num_classes == len(SYNTHIA16_TRAIN_IDS):
    return tuple(CITYSCAPES_CLASSES[t] for t in SYNTHIA16_TRAIN_IDS)
  raise ValueError(f"num_classes must be 19 or 16, got {num_classes}")


def palette(num_classes: int) -> np.ndarray:
  """(num_classes, 3) uint8 RGB palette of a 19- or 16-class experiment."""
  if num_classes == NUM_CITYSCAPES_CLASSES:
    return PALETTE
  if num_classes == len(SYNTHIA16_TRAIN_IDS):
    return PALETTE[list(SYNTHIA16_TRAIN_IDS)]
  raise ValueError(f"num_classes must be 19 or 16, got {num_classes}")


def colorize(labels: np.ndarray, num_classes: int = NUM_CITYSCAPES_CLASSES) -> np.ndarray:
  """(..., H, W) int labels -> (..., H, W, 3) uint8 RGB; ignored/out-of-range pixels are black."""
  pal = np.zeros((256, 3), np.uint8)
  pal[:num_classes] = palette(num_classes)
  labels = np.asarray(labels)
  idx = np.where((labels >= 0) & (labels < num_classes), labels, 255).astype(np.int64)
  return pal[idx]
