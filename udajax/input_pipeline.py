"""tf.data input pipelines over the udajax TFDS datasets (random access, resumable, sharded).

Batches come out as numpy arrays with a leading device axis, ready for `jax.pmap`:
  "image": float32 (num_local_devices, B, H, W, 3), normalised like the reference: RGB -> BGR,
           minus (104.00698793, 116.66876762, 122.67891434), no scaling;
  "label": int32 (num_local_devices, B, H, W), 255 = ignore (19 train ids, or 16 with
           num_classes=16);
  eval batches add "mask" bool (num_local_devices, B) and "file_name" bytes (num_local_devices, B).

Determinism (training). Examples are read by index from the ArrayRecord files
(`tfds.data_source`). The global example stream is a concatenation of epochs, each a permutation
of the split drawn from (seed, dataset name and config, epoch); step s consumes stream positions
[s * G, (s + 1) * G) with G = num_shards * num_local_devices * B, and shard k takes the k-th
contiguous block of that range. Every random augmentation decision of an example is a stateless
function of (seed, dataset name and config, stream position). So the batch of step s is a pure
function of (seed, s, shard, sharding), and a run started at `start_step=k` yields exactly the
batches an uninterrupted run yields from step k on. Reading (a small py_function per example), PNG
decoding, resizing and augmentation run in one parallel, order-preserving tf.data map.

Augmentation (the reference's `_train_sync_transform`, after its resize, which the resized builder
configs already did at build time): horizontal flip of image and label with p = 0.5; Gaussian blur
of the image with p = 0.5 and sigma ~ U(0, 1), as PIL's `GaussianBlur(radius=sigma)` (radius is the
standard deviation there): PIL's own approximation, 3 passes of a fractional box blur per axis
with edge-replicated borders (`udajax.tf_image_ops.gaussian_blur`), rounded to integers like
PIL's uint8 output.

`image_size` other than the stored size resizes on the fly (bicubic with antialiasing for the
image, clipped and rounded like PIL; PIL-style nearest for the label). The functions here allow
any size; the trainer rejects training crops larger than the stored images (an upscale is almost
always a config mistake), while evaluation may use any size.
"""

import zlib
from typing import Iterator, Optional, Tuple

import numpy as np

from udajax import datasets as datasets_lib
from udajax import labels as labels_lib
from udajax.datasets.common import tf, tfds  # importing it hides accelerators from TF
from udajax.tf_image_ops import gaussian_blur, normalize, tf_resize_image, tf_resize_label


def _shard_defaults(shard_index, num_shards):
  if shard_index is None or num_shards is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    num_shards = jax.process_count() if num_shards is None else num_shards
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
  return shard_index, num_shards


def _data_source(name, builder_config, split, data_dir):
  builder = datasets_lib.load_builder(name, builder_config, data_dir)
  source = builder.as_data_source(
      split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return builder, source


def num_examples(name: str, builder_config: str, split: str, data_dir: Optional[str] = None) -> int:
  """Number of examples of a built split (TFDS slicing syntax such as "train[:-500]" allowed)."""
  builder = datasets_lib.load_builder(name, builder_config, data_dir)
  return int(builder.info.splits[split].num_examples)


def _stream_key(seed: int, name: str, builder_config: str) -> int:
  """Mixes dataset name and config into the seed: source and target streams are independent
  even with the same seed (e.g. the demo's source and target configs of one dataset)."""
  return (int(seed) * 1_000_003 + zlib.crc32(f"{name}/{builder_config}".encode())) % (2**31 - 1)


class _EpochPermutations:
  """perm(epoch): a permutation of range(n) drawn from (key, epoch); caches the last two."""

  def __init__(self, n: int, key: int):
    self.n, self.key, self._cache = n, key, {}

  def __call__(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)  # called from parallel tf.data threads: no check-then-read
    if perm is None:
      perm = np.random.default_rng([self.key, epoch, 0x5EED]).permutation(self.n)
      if len(self._cache) >= 4:
        self._cache.clear()
      self._cache[epoch] = perm
    return perm


def _read_record(source, index_fn):
  """A tf op reading one serialized example by index through Python (ArrayRecord random access).

  A py_function inside the parallel map (rather than a generator dataset) keeps tf.data free of
  Python state at interpreter exit.
  """
  def read(x):
    return source[int(index_fn(int(x.numpy())))]
  def op(x):
    out = tf.py_function(read, [x], tf.string)
    out.set_shape([])
    return out
  return op


# ----------------------------------------------------------------------------------------------
# TF ops


_PARSE_SPEC = {k: tf.io.FixedLenFeature([], tf.string) for k in ("image", "label", "file_name")}


def _parse(serialized):
  """Serialized example -> (image uint8 (H, W, 3), label uint8 (H, W), file_name string)."""
  ex = tf.io.parse_single_example(serialized, _PARSE_SPEC)
  image = tf.io.decode_png(ex["image"], channels=3)
  label = tf.io.decode_png(ex["label"], channels=1)[..., 0]
  return image, label, ex["file_name"]


def _remap(label, num_classes):
  if num_classes == labels_lib.NUM_CITYSCAPES_CLASSES:
    return tf.cast(label, tf.int32)
  if num_classes == len(labels_lib.SYNTHIA16_TRAIN_IDS):
    lut = tf.constant(labels_lib.TRAIN_ID_TO_16, tf.int32)
    return tf.gather(lut, tf.cast(label, tf.int32))
  raise ValueError(f"num_classes must be 19 or 16, got {num_classes}")


def _augment(image, label, seed_key, position):
  """Flip (p=0.5, image and label) then blur (p=0.5, sigma ~ U(0, 1)), keyed by (seed, position)."""
  u = tf.random.stateless_uniform([3], seed=tf.stack([tf.cast(seed_key, tf.int64), position]))
  flip = u[0] < 0.5
  image, label = tf.cond(
      flip, lambda: (tf.reverse(image, [1]), tf.reverse(label, [1])), lambda: (image, label))
  image = tf.cond(
      u[1] < 0.5, lambda: tf.clip_by_value(tf.round(gaussian_blur(image, u[2])), 0.0, 255.0),
      lambda: image)
  return image, label


def _to_devices(batch, num_local_devices, batch_size_per_device):
  def f(x):
    return np.reshape(x, (num_local_devices, batch_size_per_device) + x.shape[1:])
  return {k: f(v) for k, v in batch.items()}


def _map(ds, fn):
  """`ds.map(fn)` in parallel, order kept. `fn` is traced as written, without AutoGraph: its
  branches on tensors are explicit `tf.cond`s, and AutoGraph's source conversion took about
  half of an iterator's start-up (1.07 -> 0.46 s to the first source training batch of the demo
  data, 2-core Intel Xeon VM: benchmarks/bench_pipeline_startup.py)."""
  return ds.map(tf.autograph.experimental.do_not_convert(fn),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _tf_options():
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  return options


# ----------------------------------------------------------------------------------------------
# Public API


def train_iterator(
    name: str,
    *,
    builder_config: str,
    split: str,
    data_dir: Optional[str] = None,
    image_size: Optional[Tuple[int, int]] = None,
    batch_size_per_device: int,
    num_local_devices: int,
    num_classes: int,
    seed: int,
    start_step: int = 0,
    augment: bool = True,
    shard_index: Optional[int] = None,
    num_shards: Optional[int] = None,
    with_labels: bool = True,
) -> Iterator[dict]:
  """Infinite, shuffled, augmented training batches (see the module docstring for determinism).

  Args:
    name: "gta5", "synthia", "cityscapes" or "udajax_demo".
    builder_config: e.g. "1280x720", "1024x512", "full", "source", "target".
    split: e.g. "train", "validation", or a TFDS slice such as "train[:-500]".
    image_size: (H, W) of the batches; None = the stored size (all examples must share it).
    batch_size_per_device, num_local_devices: batches are (num_local_devices, B, ...).
    num_classes: 19, or 16 (train ids remapped with labels.TRAIN_ID_TO_16; others -> 255).
    seed, start_step: the batch of step s is a pure function of (seed, s, shard).
    shard_index, num_shards: default jax.process_index() / jax.process_count().
    with_labels: False drops "label" (e.g. an unlabelled target domain).
  Yields:
    {"image": float32 (D, B, H, W, 3), "label": int32 (D, B, H, W)}.
  """
  shard_index, num_shards = _shard_defaults(shard_index, num_shards)
  builder, source = _data_source(name, builder_config, split, data_dir)
  n = len(source)
  if n == 0:
    raise ValueError(f"{name}/{builder_config} split {split!r} is empty")
  del builder
  local_batch = batch_size_per_device * num_local_devices
  global_batch = local_batch * num_shards
  shard_offset = local_batch * shard_index
  key = _stream_key(seed, name, builder_config)
  _remap(tf.zeros([1], tf.uint8), num_classes)  # validates num_classes early

  perms = _EpochPermutations(n, key)
  read = _read_record(source, lambda p: perms(p // n)[p % n])

  def position(q):
    """Stream position of the q-th example this shard yields (q counts from 0 at start_step)."""
    step = start_step + q // local_batch
    return step * global_batch + shard_offset + q % local_batch

  def process(q):
    pos = position(q)
    image, label, _ = _parse(read(pos))
    if image_size is not None:
      image = tf_resize_image(image, image_size)
      label = tf_resize_label(label, image_size)
    else:
      image = tf.cast(image, tf.float32)
    if augment:
      image, label = _augment(image, label, key, pos)
    out = {"image": normalize(image)}
    if with_labels:
      out["label"] = _remap(label, num_classes)
    return out

  ds = tf.data.Dataset.counter(0, dtype=tf.int64)
  ds = _map(ds, process)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(2).with_options(_tf_options())
  for batch in ds.as_numpy_iterator():
    yield _to_devices(batch, num_local_devices, batch_size_per_device)


def eval_shard_indices(n: int, shard_index: int, num_shards: int, local_batch: int):
  """Example indices of one shard, padded to a multiple of local_batch that all shards share.

  Returns (indices int64 (num_batches * local_batch,), mask bool (same)); padding repeats index 0.
  """
  own = np.arange(shard_index, n, num_shards, dtype=np.int64)
  per_shard = -(-n // num_shards)
  num_batches = max(1, -(-per_shard // local_batch))
  total = num_batches * local_batch
  idx = np.zeros((total,), np.int64)
  mask = np.zeros((total,), bool)
  idx[:len(own)] = own
  mask[:len(own)] = True
  return idx, mask


def eval_iterator(
    name: str,
    *,
    builder_config: str,
    split: str,
    data_dir: Optional[str] = None,
    image_size: Optional[Tuple[int, int]] = None,
    label_size: Optional[Tuple[int, int]] = None,
    batch_size_per_device: int,
    num_local_devices: int,
    num_classes: int,
    shard_index: Optional[int] = None,
    num_shards: Optional[int] = None,
) -> Iterator[dict]:
  """Finite evaluation batches covering every example of this shard exactly once.

  Shard k gets examples k, k + num_shards, ...; every shard yields the same number of batches
  (needed by multi-host pmap), the last ones padded with mask False and label 255.

  Args:
    image_size: (H, W) of the images; None = the stored size (examples batched together must
      share it: set it for GTA5 "full", whose frames differ slightly in size).
    label_size: (H, W) of the labels; None = same as the image. E.g. image (512, 1024) with
      label (1024, 2048) from the "full" config for full-resolution evaluation.
  Yields:
    {"image": float32 (D, B, H, W, 3), "label": int32 (D, B, h, w), "mask": bool (D, B),
     "file_name": bytes object array (D, B)}.
  """
  shard_index, num_shards = _shard_defaults(shard_index, num_shards)
  builder, source = _data_source(name, builder_config, split, data_dir)
  del builder
  if len(source) == 0:
    raise ValueError(f"{name}/{builder_config} split {split!r} is empty")
  local_batch = batch_size_per_device * num_local_devices
  idx, mask = eval_shard_indices(len(source), shard_index, num_shards, local_batch)
  if label_size is None:
    label_size = image_size
  _remap(tf.zeros([1], tf.uint8), num_classes)

  read = _read_record(source, lambda i: i)

  def process(index, valid):
    image, label, file_name = _parse(read(index))
    if image_size is not None:
      image = tf_resize_image(image, image_size)
    else:
      image = tf.cast(image, tf.float32)
    if label_size is not None:
      label = tf_resize_label(label, label_size)
    label = _remap(label, num_classes)
    label = tf.where(valid, label, tf.fill(tf.shape(label), labels_lib.IGNORE_LABEL))
    return {"image": normalize(image), "label": label, "mask": valid, "file_name": file_name}

  ds = tf.data.Dataset.from_tensor_slices((idx, mask))
  ds = _map(ds, process)
  ds = ds.batch(local_batch, drop_remainder=False)  # len(idx) is a multiple of local_batch
  ds = ds.prefetch(2).with_options(_tf_options())
  for batch in ds.as_numpy_iterator():
    yield _to_devices(batch, num_local_devices, batch_size_per_device)
