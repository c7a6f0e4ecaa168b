"""Shared pieces of the udajax TFDS builders: TF setup, image I/O, resizing, errors, build stats.

Every builder stores three features per example:
  image:     (H, W, 3) uint8 RGB, PNG-encoded;
  label:     (H, W, 1) uint8 Cityscapes train ids (0..18), 255 = ignore, PNG-encoded;
  file_name: the source image's path relative to the dataset root.

Resized builder configs ("1280x720", ...) resize at build time with PIL: bicubic for the image,
nearest for the label, as the reference does at every training step.
"""

import collections
import concurrent.futures
import dataclasses
import inspect
import io
import logging
import os
from typing import Callable, Iterable, Iterator, Optional, Tuple

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top
from etils import epath  # pylint: disable=g-import-not-at-top

from udajax.dataset_paths import (  # noqa: E402,F401  (re-exported)
    BUILD_SCRIPT, CLI_NAMES, build_command,
)
from udajax.errors import CorruptFileError, DatasetNotBuiltError  # noqa: E402,F401  (re-exported)


def _hide_accelerators_from_tf():
  """TF is only used for input pipelines here: it must never grab a GPU/TPU that JAX uses."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # Already initialised (e.g. a user's own TF code ran first).
    pass


_hide_accelerators_from_tf()

VERSION = tfds.core.Version("1.0.0")
RELEASE_NOTES = {"1.0.0": "Initial release."}
# Random-access reads (tfds.data_source) need ArrayRecord; every udajax dataset is built in it.
FILE_FORMAT = "array_record"


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the udajax builders (never registered in the global TFDS registry).

  Overrides `code_path`: TFDS 4.9.10's default implementation imports `importlib_resources`,
  which its own requirements install only on Python < 3.9.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(inspect.getfile(cls))


@dataclasses.dataclass(eq=False)
class SegConfig(tfds.core.BuilderConfig):
  """A builder config: `size` = (width, height) of the stored examples, or None = original size."""
  size: Optional[Tuple[int, int]] = None


def seg_features(size: Optional[Tuple[int, int]]) -> tfds.features.FeaturesDict:
  """Feature spec: fixed (H, W) when the config resizes, else any size."""
  h, w = (size[1], size[0]) if size else (None, None)
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format="png"),
      "label": tfds.features.Image(shape=(h, w, 1), dtype=np.uint8, encoding_format="png"),
      "file_name": tfds.features.Text(),
  })


# ----------------------------------------------------------------------------------------------
# Decoding source files. Every failure is re-raised as CorruptFileError naming the path.


def read_bytes(path: str, opener: Optional[Callable[[str], bytes]] = None) -> bytes:
  try:
    if opener is not None:
      return opener(path)
    with open(path, "rb") as f:
      return f.read()
  except (OSError, KeyError) as e:
    raise CorruptFileError(f"cannot read {path}: {e}") from e


def decode_pil(data: bytes, path: str, modes: Tuple[str, ...]) -> Image.Image:
  """Fully decodes an image with PIL (truncation is an error, not padding), checking its mode."""
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise CorruptFileError(f"cannot decode {path}: {type(e).__name__}: {e}") from e
  if img.mode not in modes:
    raise CorruptFileError(f"{path}: unexpected PNG mode {img.mode!r} (expected one of {modes})")
  return img


def decode_png16(data: bytes, path: str) -> np.ndarray:
  """Decodes a (possibly 16-bit, multi-channel) PNG keeping every channel: (H, W, C) uint16."""
  if data[:8] != b"\x89PNG\r\n\x1a\n":
    raise CorruptFileError(f"{path}: not a PNG file")
  try:
    arr = tf.io.decode_png(data, channels=0, dtype=tf.uint16).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.OpError) as e:
    raise CorruptFileError(f"cannot decode {path}: {e.message.splitlines()[0]}") from e
  return arr


def pil_resize_image(img: Image.Image, size: Optional[Tuple[int, int]]) -> np.ndarray:
  """PIL image -> (H, W, 3) uint8, bicubic-resized to size = (W, H) when given."""
  if size is not None and img.size != tuple(size):
    img = img.resize(tuple(size), Image.BICUBIC)
  return np.asarray(img, dtype=np.uint8)


def pil_resize_label(label: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """(H, W) uint8 -> nearest-resized to size = (W, H) (PIL nearest, as the reference)."""
  if (label.shape[1], label.shape[0]) == tuple(size):
    return label
  return np.asarray(Image.fromarray(label).resize(tuple(size), Image.NEAREST), dtype=np.uint8)


def encode_png(arr: np.ndarray, compress_level: int = 3) -> bytes:
  """(H, W, 3) or (H, W[, 1]) uint8 -> PNG bytes (PIL; runs in the builders' worker threads)."""
  arr = np.asarray(arr, dtype=np.uint8)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
  return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Parallel, ordered, memory-bounded example generation with corrupt-file handling.


class BuildStats:
  """Counters a build reports (per split): written, skipped corrupt files, resized labels."""

  def __init__(self):
    self.counts = collections.defaultdict(collections.Counter)
    self.skipped_files = []

  def add(self, split: str, key: str, n: int = 1):
    self.counts[split][key] += n

  def as_dict(self):
    return {split: dict(c) for split, c in self.counts.items()}


def _bounded_ordered_map(fn, items, num_workers: int) -> Iterator:
  """Like executor.map(fn, items) but with at most 2 * num_workers results in flight."""
  if num_workers <= 1:
    for item in items:
      yield _call(fn, item)
    return
  with concurrent.futures.ThreadPoolExecutor(num_workers) as ex:
    window = collections.deque()
    for item in items:
      window.append(ex.submit(_call, fn, item))
      if len(window) >= 2 * num_workers:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


def _call(fn, item):
  try:
    return item, fn(item), None
  except CorruptFileError as e:
    return item, None, e


def generate_examples(
    items: Iterable,
    load_fn: Callable,
    *,
    split: str,
    stats: BuildStats,
    skip_corrupt: bool,
    num_workers: int,
) -> Iterator[Tuple[str, dict]]:
  """Yields (key, example) for each item; load_fn(item) -> (key, example, resized_label: bool).

  A CorruptFileError raised by load_fn fails the build (the path is in its message) or, with
  skip_corrupt, is logged, counted under "skipped" and recorded in stats.skipped_files.
  """
  for _, out, err in _bounded_ordered_map(load_fn, list(items), num_workers):
    if err is not None:
      if not skip_corrupt:
        raise CorruptFileError(
            f"{err}\n(pass --skip_corrupt to data_prep/build_datasets.py to skip and count such "
            "files)"
        ) from err
      logging.warning("skipping corrupt example: %s", err)
      stats.add(split, "skipped")
      stats.skipped_files.append(str(err))
      continue
    key, example, resized = out
    stats.add(split, "examples")
    if resized:
      stats.add(split, "label_resized")
    yield key, example


def default_num_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------
# Builders of (image, label) file pairs: GTA5, SYNTHIA, Cityscapes.


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example's source files. `image`/`label` are paths (or zip members) given to the opener."""
  key: str
  image: str
  label: str
  file_name: str


def png_bit_depth(data: bytes) -> int:
  """Bit depth from a PNG's IHDR chunk (8 or 16 for the files here)."""
  if len(data) < 26 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
    return -1
  return data[24]


class PairedSegBuilder(Builder, skip_registration=True):
  """Base of the manual-download builders: reads (image, label) pairs, maps labels, resizes.

  Subclasses define `_pairs(manual_dir, split)` -> list of Pair, `_split_names()`,
  `_raw_labels(data, path)` -> (H, W) uint8 train ids, and optionally `_opener(manual_dir)`.
  Keyword arguments: skip_corrupt (skip unreadable files, counted in build_stats) and
  num_workers (decode/resize/encode threads).
  """

  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES

  def __init__(self, *, skip_corrupt: bool = False, num_workers: Optional[int] = None, **kwargs):
    super().__init__(**kwargs)
    self.skip_corrupt = skip_corrupt
    self.num_workers = num_workers or default_num_workers()
    self.build_stats = BuildStats()

  def _info(self):
    return self.dataset_info_from_configs(
        description=self.__doc__,
        features=seg_features(self.builder_config.size),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )

  # -- subclass hooks

  def _split_names(self):
    return ("train",)

  def _pairs(self, manual_dir: str, split: str):
    raise NotImplementedError

  def _raw_labels(self, data: bytes, path: str) -> np.ndarray:
    raise NotImplementedError

  def _opener(self, manual_dir: str):
    return None

  # -- generation

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    opener = self._opener(manual_dir)
    gens = {}
    for split in self._split_names():
      pairs = self._pairs(manual_dir, split)
      if not pairs:
        raise FileNotFoundError(
            f"no {self.name} {split} images found under {manual_dir}.\n"
            f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      gens[split] = self._generate_examples(pairs, split, opener)
    return gens

  def _load(self, pair: Pair, opener):
    size = self.builder_config.size
    image_bytes = read_bytes(pair.image, opener)
    img = decode_pil(image_bytes, pair.image, ("RGB", "RGBA", "P", "L"))
    was_rgb = img.mode == "RGB"
    img = img if was_rgb else img.convert("RGB")
    label = self._raw_labels(read_bytes(pair.label, opener), pair.label)
    out_size = tuple(size) if size else img.size
    resized = (label.shape[1], label.shape[0]) != img.size
    label = pil_resize_label(label, out_size)
    if size is None and was_rgb and png_bit_depth(image_bytes) == 8:
      image_png = image_bytes  # already an 8-bit RGB PNG: store as is
    else:
      # Level 6 (PIL's default): ~13% smaller and ~10% faster to decode than level 3; the build
      # is a one-off, decoding happens at every training step.
      image_png = encode_png(pil_resize_image(img, out_size), compress_level=6)
    example = {"image": image_png, "label": encode_png(label, compress_level=1),
               "file_name": pair.file_name}
    return pair.key, example, resized

  def _generate_examples(self, pairs, split, opener):
    yield from generate_examples(
        pairs, lambda p: self._load(p, opener), split=split, stats=self.build_stats,
        skip_corrupt=self.skip_corrupt, num_workers=self.num_workers)
    self.info.metadata[split] = self.build_stats.as_dict().get(split, {})
    if self.build_stats.skipped_files:
      self.info.metadata["skipped_files"] = list(self.build_stats.skipped_files)


def list_pngs(folder: str):
  """Sorted *.png names in a folder ([] if it does not exist)."""
  if not os.path.isdir(folder):
    return []
  return sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
