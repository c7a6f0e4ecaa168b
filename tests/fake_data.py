"""Small fake dataset trees in the real on-disk layouts of GTA5, SYNTHIA and Cityscapes.

Each writer returns {file_name: expected (H, W) uint8 train ids at the image's size}, where
file_name is the `file_name` feature the builder stores. Expected labels are computed here
independently of the builders (plain dict lookups), so tests can compare pixel by pixel.
"""

import io
import os
import zipfile

import numpy as np
from PIL import Image

# Raw id -> train id, written out again here on purpose (tests must not reuse the code under test).
CITYSCAPES_MAP = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                  24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_MAP = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18,
               12: 17, 15: 6, 16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3}


def _map(raw, table):
  out = np.full(raw.shape, 255, np.uint8)
  for k, v in table.items():
    out[raw == k] = v
  return out


def smooth_image(rng, h, w, noise=3):
  """A compressible RGB image (gradients, blocks, mild noise) like a rendered frame."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1),
                  128 + 60 * np.sin(xx / 17.0)], -1)
  for _ in range(6):
    y0, x0 = rng.integers(0, h), rng.integers(0, w)
    img[y0:y0 + h // 4, x0:x0 + w // 5] = rng.integers(0, 256, size=3)
  img += rng.normal(0, noise, size=img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def _raw_ids(rng, h, w, max_id):
  """Blocky raw id maps (so nearest resizing is well defined) covering ids 0..max_id."""
  bh, bw = max(1, h // 6), max(1, w // 8)
  small = rng.integers(0, max_id + 1, size=(-(-h // bh), -(-w // bw)))
  return np.repeat(np.repeat(small, bh, 0), bw, 1)[:h, :w]


def pil_nearest(arr, size_wh):
  return np.asarray(Image.fromarray(arr).resize(size_wh, Image.NEAREST))


# ----------------------------------------------------------------------------------------------


def write_gta5(root, n=3, size=(48, 30), mismatch=(1,), seed=0, noise=3):
  """GTA5 tree: images/NNNNN.png RGB, labels/NNNNN.png 8-bit *palette* PNGs (index = label id).

  The palette maps each index to an unrelated colour, so reading RGB instead of the index fails.
  Frames listed in `mismatch` get a label of a different size (nearest-resized to the image).
  """
  rng = np.random.default_rng(seed)
  w, h = size
  palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
  expected = {}
  for i in range(n):
    name = f"{i + 1:05d}.png"
    image = smooth_image(rng, h, w, noise)
    lh, lw = (h + 7, w - 5) if i in mismatch else (h, w)
    raw = _raw_ids(rng, lh, lw, 35).astype(np.uint8)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    Image.fromarray(image).save(os.path.join(root, "images", name))
    lbl = Image.frombytes("P", (lw, lh), np.ascontiguousarray(raw).tobytes())
    lbl.putpalette(palette.tobytes())
    assert lbl.mode == "P"
    lbl.save(os.path.join(root, "labels", name))
    train = _map(raw, CITYSCAPES_MAP)
    if (lh, lw) != (h, w):
      train = pil_nearest(train, (w, h))
    expected[f"images/{name}"] = train
  return expected


def encode_png16(arr):
  """(H, W, C) uint16 -> 16-bit PNG bytes (PIL cannot write these)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.encode_png(tf.constant(arr, tf.uint16)).numpy()


def write_synthia(root, n=3, size=(40, 24), channels=3, seed=1):
  """SYNTHIA tree: RAND_CITYSCAPES/RGB and GT/LABELS; labels are 16-bit PNGs with the class id in
  channel 0 and a large instance id (> 255) in channel 1."""
  rng = np.random.default_rng(seed)
  w, h = size
  base = os.path.join(root, "RAND_CITYSCAPES")
  os.makedirs(os.path.join(base, "RGB"), exist_ok=True)
  os.makedirs(os.path.join(base, "GT", "LABELS"), exist_ok=True)
  expected = {}
  for i in range(n):
    name = f"{i:07d}.png"
    Image.fromarray(smooth_image(rng, h, w)).save(os.path.join(base, "RGB", name))
    cls = _raw_ids(rng, h, w, 23).astype(np.uint16)
    lab = np.zeros((h, w, channels), np.uint16)
    lab[..., 0] = cls
    lab[..., 1] = rng.integers(256, 5000, size=(h, w))  # instance ids
    if channels > 2:
      lab[..., 2] = rng.integers(0, 65535, size=(h, w))
    with open(os.path.join(base, "GT", "LABELS", name), "wb") as f:
      f.write(encode_png16(lab))
    expected[f"RAND_CITYSCAPES/RGB/{name}"] = _map(cls, SYNTHIA_MAP)
  return expected


def write_cityscapes(root, size=(64, 32), as_zip=False, seed=2,
                     cities={"train": ("aachen", "bremen"), "validation": ("frankfurt",)},
                     per_city=2):
  """Cityscapes tree (leftImg8bit/ + gtFine/, or the two official zips). Returns
  {split: {file_name: expected train ids}}."""
  rng = np.random.default_rng(seed)
  w, h = size
  files = {}  # relative path -> png bytes
  expected = {}
  for split, split_cities in cities.items():
    sub = {"train": "train", "validation": "val"}[split]
    expected[split] = {}
    for city in split_cities:
      for j in range(per_city):
        stem = f"{city}_{j:06d}_000019"
        buf = io.BytesIO()
        Image.fromarray(smooth_image(rng, h, w)).save(buf, format="PNG")
        files[f"leftImg8bit/{sub}/{city}/{stem}_leftImg8bit.png"] = buf.getvalue()
        raw = _raw_ids(rng, h, w, 35).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(raw).save(buf, format="PNG")  # mode L
        files[f"gtFine/{sub}/{city}/{stem}_gtFine_labelIds.png"] = buf.getvalue()
        files[f"gtFine/{sub}/{city}/{stem}_gtFine_color.png"] = b"not used"
        expected[split][f"leftImg8bit/{sub}/{city}/{stem}_leftImg8bit.png"] = _map(
            raw, CITYSCAPES_MAP)
  # A test-split image without usable labels must be ignored.
  files["leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png"] = files[next(iter(files))]
  if as_zip:
    os.makedirs(root, exist_ok=True)
    for top, zname in (("leftImg8bit", "leftImg8bit_trainvaltest.zip"),
                       ("gtFine", "gtFine_trainvaltest.zip")):
      with zipfile.ZipFile(os.path.join(root, zname), "w") as z:
        z.writestr("README", "fake")
        for rel, data in files.items():
          if rel.startswith(top + "/"):
            z.writestr(rel, data)
  else:
    for rel, data in files.items():
      path = os.path.join(root, *rel.split("/"))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(data)
  return expected


def corrupt_png(path, keep=0.5):
  """Truncates a PNG file to a fraction of its bytes."""
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:max(40, int(len(data) * keep))])
