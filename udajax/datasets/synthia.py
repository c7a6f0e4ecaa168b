"""`synthia`: SYNTHIA-RAND-CITYSCAPES (Ros et al. 2016), 9,400 frames at 1280x760.

Files the user has (the extracted SYNTHIA_RAND_CITYSCAPES archive):
  RAND_CITYSCAPES/RGB/NNNNNNN.png        RGB frames
  RAND_CITYSCAPES/GT/LABELS/NNNNNNN.png  16-bit multi-channel PNGs: class id in the first
                                         channel, instance id in the second
PIL cannot read 16-bit multi-channel PNGs correctly, so labels are decoded with
`tf.io.decode_png(..., dtype=tf.uint16)` keeping all channels; channel 0 is mapped to the 19
Cityscapes train ids (SYNTHIA's own id table, 255 = ignore). 16-class experiments remap in the
input pipeline (num_classes=16).

Builder configs: "full" and "1280x760" (the same size for this dataset; both names work).
Split: "train" = every frame; a held-out slice is TFDS slicing, e.g. "train[-100:]" (see gta5).
"""

import os

import numpy as np

from udajax import labels
from udajax.datasets import common


class Synthia(common.PairedSegBuilder, skip_registration=True):
  """SYNTHIA-RAND-CITYSCAPES frames with Cityscapes train-id labels."""

  name = "synthia"
  BUILDER_CONFIGS = [
      common.SegConfig(name="full", description="Original size (1280x760).", size=None),
      common.SegConfig(name="1280x760", description="Resized to 1280x760 (W x H).",
                       size=(1280, 760)),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download SYNTHIA-RAND-CITYSCAPES (SYNTHIA_RAND_CITYSCAPES.rar) from
  https://synthia-dataset.net/downloads/ and extract it; pass the folder that contains
  RAND_CITYSCAPES/ (or RAND_CITYSCAPES itself) as --manual_dir
  (python data_prep/build_datasets.py synthia --manual_dir=/data/SYNTHIA).
  """

  def _pairs(self, manual_dir, split):
    del split
    root = manual_dir
    if not os.path.isdir(os.path.join(root, "RGB")):
      root = os.path.join(manual_dir, "RAND_CITYSCAPES")
    rgb = os.path.join(root, "RGB")
    rel = os.path.relpath(root, manual_dir)
    rel = "" if rel == "." else rel + "/"
    return [
        common.Pair(key=os.path.splitext(f)[0], image=os.path.join(rgb, f),
                    label=os.path.join(root, "GT", "LABELS", f), file_name=f"{rel}RGB/{f}")
        for f in common.list_pngs(rgb)
    ]

  def _raw_labels(self, data, path):
    if common.png_bit_depth(data) == 8:  # Tolerate 8-bit re-encodings of the labels.
      arr = common.decode_pil(data, path, ("L", "P", "RGB", "RGBA"))
      arr = np.asarray(arr)
      ids = arr if arr.ndim == 2 else arr[..., 0]
    else:
      arr = common.decode_png16(data, path)
      ids = arr[..., 0]
    return labels.SYNTHIA_ID_TO_TRAIN_ID[ids]
