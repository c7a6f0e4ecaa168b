"""`gta5`: GTA5 ("Playing for Data", Richter et al. 2016), 24,966 frames at 1914x1052.

Files the user has (all ten image and label archives extracted into one folder):
  images/NNNNN.png  RGB frames
  labels/NNNNN.png  8-bit palette PNGs whose palette *index* is the Cityscapes label id
                    (the palette colours are only for display and are ignored)
Labels are mapped to the 19 Cityscapes train ids (255 = ignore) at build time. A few label files
differ in size from their frame: they are resized (nearest) to the frame's size, or straight to
the config size for resized configs as the reference does, and counted ("label_resized").

Builder configs: "full" (original size) and "1280x720" (image bicubic, label nearest, with PIL).
Split: "train" = every frame. A held-out slice is TFDS slicing of it: examples are stored in a
fixed pseudo-random order (TFDS shuffles by key hash), so "train[-500:]" is a random held-out set
of 500 frames and "train[:-500]" the rest.
"""

import os

import numpy as np

from udajax import labels
from udajax.datasets import common


class Gta5(common.PairedSegBuilder, skip_registration=True):
  """GTA5 frames with Cityscapes train-id labels."""

  name = "gta5"
  BUILDER_CONFIGS = [
      common.SegConfig(name="full", description="Original size (mostly 1914x1052).", size=None),
      common.SegConfig(name="1280x720", description="Resized to 1280x720 (W x H).",
                       size=(1280, 720)),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the GTA5 dataset from https://download.visinf.tu-darmstadt.de/data/from_games/
  (01_images.zip ... 10_images.zip and 01_labels.zip ... 10_labels.zip), extract all of them
  into one folder so that it contains images/NNNNN.png and labels/NNNNN.png, and pass that folder
  as --manual_dir (python data_prep/build_datasets.py gta5 --manual_dir=/data/GTA5).
  """

  def _pairs(self, manual_dir, split):
    del split
    images = os.path.join(manual_dir, "images")
    out = []
    for f in common.list_pngs(images):
      out.append(common.Pair(
          key=os.path.splitext(f)[0], image=os.path.join(images, f),
          label=os.path.join(manual_dir, "labels", f), file_name=f"images/{f}"))
    return out

  def _raw_labels(self, data, path):
    img = common.decode_pil(data, path, ("P", "L"))
    return labels.CITYSCAPES_ID_TO_TRAIN_ID[np.asarray(img, dtype=np.uint8)]
