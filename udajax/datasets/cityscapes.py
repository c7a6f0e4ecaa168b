"""`cityscapes`: Cityscapes gtFine (Cordts et al. 2016), 2,975 train and 500 val images, 2048x1024.

Files the user has, either extracted:
  leftImg8bit/{train,val}/CITY/*_leftImg8bit.png
  gtFine/{train,val}/CITY/*_gtFine_labelIds.png     8-bit Cityscapes label ids
or the two official zips leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (read in place,
nothing is extracted). Labels are mapped to the 19 train ids (255 = ignore) at build time.

Builder configs: "full" (2048x1024) and "1024x512" (image bicubic, label nearest, with PIL: the
reference's training and evaluation size). Splits: "train" (official train, 2,975) and
"validation" (official val, 500). The test split has no public labels and is not built.
"""

import os
import threading
import zipfile

import numpy as np

from udajax import labels
from udajax.datasets import common

IMAGES_ZIP = "leftImg8bit_trainvaltest.zip"
LABELS_ZIP = "gtFine_trainvaltest.zip"
_SPLIT_DIRS = {"train": "train", "validation": "val"}
_IMG_SUFFIX = "_leftImg8bit.png"
_LBL_SUFFIX = "_gtFine_labelIds.png"


class _ZipOpener:
  """Reads members of the two official zips; one ZipFile handle per thread."""

  def __init__(self, paths):
    self.paths = paths  # top-level folder ("leftImg8bit" / "gtFine") -> zip path
    self.local = threading.local()

  def _zip(self, zip_path):
    cache = self.local.__dict__.setdefault("zips", {})
    if zip_path not in cache:
      cache[zip_path] = zipfile.ZipFile(zip_path)
    return cache[zip_path]

  def __call__(self, name):
    zip_path = self.paths[name.split("/", 1)[0]]
    try:
      return self._zip(zip_path).read(name)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zipfile.LargeZipFile) as e:
      raise OSError(f"{zip_path}:{name}: {e}") from e

  def names(self, top):
    with zipfile.ZipFile(self.paths[top]) as z:
      return z.namelist()


class Cityscapes(common.PairedSegBuilder, skip_registration=True):
  """Cityscapes fine annotations with train-id labels."""

  name = "cityscapes"
  BUILDER_CONFIGS = [
      common.SegConfig(name="full", description="Original size (2048x1024).", size=None),
      common.SegConfig(name="1024x512", description="Resized to 1024x512 (W x H).",
                       size=(1024, 512)),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Register at https://www.cityscapes-dataset.com/ and download leftImg8bit_trainvaltest.zip
  and gtFine_trainvaltest.zip (https://www.cityscapes-dataset.com/downloads/). Put both zips in
  one folder, or extract them there (giving leftImg8bit/ and gtFine/), and pass that folder as
  --manual_dir (python data_prep/build_datasets.py cityscapes --manual_dir=/data/cityscapes).
  """

  def _split_names(self):
    return tuple(_SPLIT_DIRS)

  def _use_zips(self, manual_dir):
    if os.path.isdir(os.path.join(manual_dir, "leftImg8bit")):
      return False
    if os.path.isfile(os.path.join(manual_dir, IMAGES_ZIP)):
      if not os.path.isfile(os.path.join(manual_dir, LABELS_ZIP)):
        raise FileNotFoundError(f"found {IMAGES_ZIP} but not {LABELS_ZIP} in {manual_dir}")
      return True
    return False

  def _opener(self, manual_dir):
    if not self._use_zips(manual_dir):
      return None
    return _ZipOpener({"leftImg8bit": os.path.join(manual_dir, IMAGES_ZIP),
                       "gtFine": os.path.join(manual_dir, LABELS_ZIP)})

  def _pairs(self, manual_dir, split):
    sub = _SPLIT_DIRS[split]
    if self._use_zips(manual_dir):
      opener = self._opener(manual_dir)
      prefix = f"leftImg8bit/{sub}/"
      images = sorted(n for n in opener.names("leftImg8bit")
                      if n.startswith(prefix) and n.endswith(_IMG_SUFFIX))
      rels = [n[len("leftImg8bit/"):] for n in images]

      def img_path(rel):
        return f"leftImg8bit/{rel}"

      def lbl_path(rel):
        return f"gtFine/{rel[:-len(_IMG_SUFFIX)]}{_LBL_SUFFIX}"
    else:
      root = os.path.join(manual_dir, "leftImg8bit", sub)
      rels = []
      if os.path.isdir(root):
        for city in sorted(os.listdir(root)):
          for f in sorted(os.listdir(os.path.join(root, city))):
            if f.endswith(_IMG_SUFFIX):
              rels.append(f"{sub}/{city}/{f}")

      def img_path(rel):
        return os.path.join(manual_dir, "leftImg8bit", *rel.split("/"))

      def lbl_path(rel):
        stem = rel[:-len(_IMG_SUFFIX)]
        return os.path.join(manual_dir, "gtFine", *(stem + _LBL_SUFFIX).split("/"))
    return [
        common.Pair(key=os.path.basename(rel)[:-len(_IMG_SUFFIX)], image=img_path(rel),
                    label=lbl_path(rel), file_name=f"leftImg8bit/{rel}")
        for rel in rels
    ]

  def _raw_labels(self, data, path):
    img = common.decode_pil(data, path, ("L", "P"))
    return labels.CITYSCAPES_ID_TO_TRAIN_ID[np.asarray(img, dtype=np.uint8)]
