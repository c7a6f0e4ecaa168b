"""Input pipeline on the (auto-built) demo dataset: shapes, normalisation, augmentation,
determinism and resumption, sharded evaluation coverage, resizing, 16-class remap, errors."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tests import train_cli
from udajax import datasets
from udajax import errors
from udajax import images
from udajax import input_pipeline as ip
from udajax import labels
from udajax import tf_image_ops as ops

MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = train_cli.demo_data_dir(tmp_path_factory)  # the session's one demo build
  assert datasets.ensure_demo_built(d) == d  # already built: returns the same folder
  return d


@pytest.fixture(scope="module")
def stored(data_dir):
  """All stored target-train and source-validation examples by index (uint8 image, label)."""
  out = {}
  for config, split in (("target", "train"), ("source", "validation")):
    b = datasets.load_builder("udajax_demo", config, data_dir)
    src = b.as_data_source(split)
    out[config, split] = [(ex["image"], ex["label"][..., 0]) for ex in src]
  return out


def _norm(rgb_uint8):
  return rgb_uint8.astype(np.float32)[..., ::-1] - MEAN_BGR


def _train(data_dir, **kw):
  args = dict(builder_config="target", split="train", data_dir=data_dir, batch_size_per_device=2,
              num_local_devices=2, num_classes=19, seed=3, shard_index=0, num_shards=1)
  args.update(kw)
  return ip.train_iterator("udajax_demo", **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_ensure_demo_built_sizes(data_dir):
  assert ip.num_examples("udajax_demo", "source", "train", data_dir) == 500
  assert ip.num_examples("udajax_demo", "target", "train", data_dir) == 500
  assert ip.num_examples("udajax_demo", "target", "validation", data_dir) == 100
  assert ip.num_examples("udajax_demo", "target", "train[:-100]", data_dir) == 400
  datasets.ensure_demo_built(data_dir)  # second call: nothing to do


def test_train_shapes_dtypes_and_ranges(data_dir):
  batch = next(_train(data_dir, num_local_devices=4, batch_size_per_device=3))
  assert batch["image"].shape == (4, 3, 96, 192, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4, 3, 96, 192) and batch["label"].dtype == np.int32
  img = batch["image"]
  for c in range(3):
    assert img[..., c].min() >= -MEAN_BGR[c] - 1e-4
    assert img[..., c].max() <= 255 - MEAN_BGR[c] + 1e-4
  assert set(np.unique(batch["label"])) <= set(range(19)) | {255}
  no_labels = next(_train(data_dir, with_labels=False))
  assert set(no_labels) == {"image"}


def test_train_without_augment_is_exact_normalised_permutation(data_dir, stored):
  """augment=False: the stream is the documented per-epoch permutation, normalised exactly."""
  n = 500
  perms = ip._EpochPermutations(n, ip._stream_key(3, "udajax_demo", "target"))
  # Steps 124 and 125 cross epoch 0 -> 1.
  batches = _take(_train(data_dir, augment=False, start_step=124), 2)
  flat_img = np.concatenate([b["image"].reshape(-1, 96, 192, 3) for b in batches])
  flat_lbl = np.concatenate([b["label"].reshape(-1, 96, 192) for b in batches])
  for j, pos in enumerate(range(124 * 4, 126 * 4)):
    idx = perms(pos // n)[pos % n]
    img, lbl = stored["target", "train"][idx]
    np.testing.assert_array_equal(flat_img[j], _norm(img))
    np.testing.assert_array_equal(flat_lbl[j], lbl)
  # Every example appears exactly once per epoch.
  assert sorted(perms(0)) == list(range(n)) and not np.array_equal(perms(0), perms(1))


def test_flip_moves_image_and_label_together(data_dir):
  aug = _take(_train(data_dir, augment=True), 8)
  plain = _take(_train(data_dir, augment=False), 8)
  flipped = kept = 0
  for a, p in zip(aug, plain):
    for ai, al, pi, pl in zip(a["image"].reshape(-1, 96, 192, 3), a["label"].reshape(-1, 96, 192),
                              p["image"].reshape(-1, 96, 192, 3), p["label"].reshape(-1, 96, 192)):
      if np.array_equal(al, pl[:, ::-1]) and not np.array_equal(al, pl):
        flipped += 1
        ref, other = pi[:, ::-1], pi
      else:
        np.testing.assert_array_equal(al, pl)
        kept += 1
        ref, other = pi, pi[:, ::-1]
      # The image went the same way as the label (blur changes it only slightly).
      assert np.abs(ai - ref).mean() < 0.5 * np.abs(ai - other).mean()
  assert flipped >= 4 and kept >= 4


def test_blur_matches_pil_gaussian_blur():
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, size=(12, 20, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(small).resize((80, 48), Image.BICUBIC))
  noise = rng.integers(0, 256, size=(40, 50, 3)).astype(np.uint8)
  for im in (img, noise):
    for sigma in (0.0, 0.3, 0.6, 1.0):
      ours = ops.gaussian_blur(ops.tf.constant(im, ops.tf.float32), sigma).numpy()
      pil = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius=sigma)),
                       np.float32)
      diff = np.abs(np.round(ours) - pil)  # PIL rounds after each of its 6 passes; we round once
      assert diff.mean() < 1.0 and diff.max() <= 3, (sigma, diff.mean(), diff.max())
  np.testing.assert_allclose(ops.gaussian_blur(ops.tf.constant(img, ops.tf.float32), 0.0).numpy(),
                             img, atol=1e-3)


def test_fast_blur_equals_three_box_passes():
  """The depthwise-convolution blur equals PIL's 3-pass recursion, borders included."""
  rng = np.random.default_rng(1)
  for shape in ((40, 50, 3), (12, 13, 3), (5, 7, 3)):
    im = ops.tf.constant(rng.integers(0, 256, size=shape).astype(np.float32))
    for sigma in (0.0, 0.4, 1.0):
      a = ops.pil_box_weight(sigma)
      exact = ops._three_box_passes(ops._three_box_passes(im, a, 1), a, 0).numpy()
      np.testing.assert_allclose(ops.gaussian_blur(im, sigma).numpy(), exact, atol=1e-3)


def test_same_seed_same_batches_and_resume(data_dir):
  a = _take(_train(data_dir, seed=11), 5)
  b = _take(_train(data_dir, seed=11), 5)
  resumed = _take(_train(data_dir, seed=11, start_step=3), 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  for k in (3, 4):
    np.testing.assert_array_equal(resumed[k - 3]["image"], a[k]["image"])
    np.testing.assert_array_equal(resumed[k - 3]["label"], a[k]["label"])
  other = next(_train(data_dir, seed=12))
  assert not np.array_equal(other["image"], a[0]["image"])


def test_shards_split_the_global_batch(data_dir):
  """Two shards of 1 device each see exactly the two halves of one shard with 2 devices."""
  whole = next(_train(data_dir, num_local_devices=2, batch_size_per_device=2, start_step=7))
  parts = [next(_train(data_dir, num_local_devices=1, batch_size_per_device=2, start_step=7,
                       shard_index=k, num_shards=2)) for k in range(2)]
  for k in range(2):
    np.testing.assert_array_equal(parts[k]["image"][0], whole["image"][k])
    np.testing.assert_array_equal(parts[k]["label"][0], whole["label"][k])


@pytest.mark.parametrize("num_shards", [1, 3])
def test_eval_covers_each_example_once(data_dir, stored, num_shards):
  n = 13  # odd count over 4 devices x 2 per device
  seen = {}
  batches_per_shard = []
  for shard in range(num_shards):
    batches = list(ip.eval_iterator(
        "udajax_demo", builder_config="source", split=f"validation[:{n}]", data_dir=data_dir,
        batch_size_per_device=2, num_local_devices=4, num_classes=19, shard_index=shard,
        num_shards=num_shards))
    batches_per_shard.append(len(batches))
    for b in batches:
      assert b["image"].shape == (4, 2, 96, 192, 3) and b["mask"].shape == (4, 2)
      assert b["mask"].dtype == bool
      assert b["label"].dtype == np.int32 and b["file_name"].shape == (4, 2)
      for img, lbl, m, fn in zip(b["image"].reshape(-1, 96, 192, 3),
                                 b["label"].reshape(-1, 96, 192),
                                 b["mask"].ravel(), b["file_name"].ravel()):
        if not m:
          assert (lbl == 255).all()
          continue
        assert fn not in seen
        seen[fn] = (img, lbl)
  assert len(set(batches_per_shard)) == 1  # every host runs the same number of eval steps
  assert len(seen) == n
  stored_by_name = {}
  b = datasets.load_builder("udajax_demo", "source", data_dir)
  for i, ex in enumerate(b.as_data_source(f"validation[:{n}]")):
    file_name = ex["file_name"]
    stored_by_name[file_name.encode() if isinstance(file_name, str) else file_name] = i
  assert set(seen) == set(stored_by_name)
  for fn, (img, lbl) in seen.items():
    ref_img, ref_lbl = stored["source", "validation"][stored_by_name[fn]]
    np.testing.assert_array_equal(img, _norm(ref_img))
    np.testing.assert_array_equal(lbl, ref_lbl)


def test_remap_16_classes(data_dir):
  kw = dict(builder_config="target", split="validation[:4]", data_dir=data_dir,
            batch_size_per_device=4, num_local_devices=1, shard_index=0, num_shards=1)
  b19 = next(ip.eval_iterator("udajax_demo", num_classes=19, **kw))
  b16 = next(ip.eval_iterator("udajax_demo", num_classes=16, **kw))
  np.testing.assert_array_equal(b16["label"], labels.TRAIN_ID_TO_16[b19["label"]])
  assert (b16["label"][b19["label"] == 9] == 255).all()  # terrain is not one of the 16
  t16 = next(_train(data_dir, num_classes=16))
  assert set(np.unique(t16["label"])) <= set(range(16)) | {255}
  with pytest.raises(ValueError, match="19 or 16"):
    next(_train(data_dir, num_classes=13))


def test_resize_on_the_fly_and_label_size(data_dir, stored):
  batch = next(_train(data_dir, image_size=(48, 96)))
  assert batch["image"].shape == (2, 2, 48, 96, 3) and batch["label"].shape == (2, 2, 48, 96)
  ev = next(ip.eval_iterator(
      "udajax_demo", builder_config="source", split="validation[:2]", data_dir=data_dir,
      image_size=(48, 96), label_size=(96, 192), batch_size_per_device=2, num_local_devices=1,
      num_classes=19, shard_index=0, num_shards=1))
  assert ev["image"].shape == (1, 2, 48, 96, 3) and ev["label"].shape == (1, 2, 96, 192)
  img0, lbl0 = stored["source", "validation"][0]
  np.testing.assert_array_equal(ev["label"][0, 0], lbl0)  # kept at full size
  pil = np.asarray(Image.fromarray(img0).resize((96, 48), Image.BICUBIC), np.float32)
  assert np.abs(images.denormalize(ev["image"][0, 0]).astype(np.float32) - pil).mean() < 2.0
  small = next(ip.eval_iterator(
      "udajax_demo", builder_config="source", split="validation[:2]", data_dir=data_dir,
      image_size=(48, 96), batch_size_per_device=2, num_local_devices=1, num_classes=19,
      shard_index=0, num_shards=1))
  np.testing.assert_array_equal(small["label"][0, 0],
                                np.asarray(Image.fromarray(lbl0).resize((96, 48), Image.NEAREST)))


def test_missing_dataset_error_names_build_command(tmp_path):
  with pytest.raises(errors.DatasetNotBuiltError) as info:
    next(ip.train_iterator("gta5", builder_config="1280x720", split="train", data_dir=str(tmp_path),
                           batch_size_per_device=1, num_local_devices=1, num_classes=19, seed=0,
                           shard_index=0, num_shards=1))
  assert isinstance(info.value, FileNotFoundError)
  expected = ("python data_prep/build_datasets.py gta5 --manual_dir=/path/to/gta5 --config=1280x720"
              f" --data_dir={tmp_path}")
  assert expected in str(info.value)
  with pytest.raises(errors.DatasetNotBuiltError, match="build_datasets.py demo"):
    ip.num_examples("udajax_demo", "source", "train", str(tmp_path))


def test_default_shard_is_jax_process(data_dir):
  a = next(_train(data_dir, shard_index=None, num_shards=None))
  b = next(_train(data_dir))
  np.testing.assert_array_equal(a["image"], b["image"])
