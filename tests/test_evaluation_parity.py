"""`python -m udajax.evaluate` equals the official Cityscapes evaluator; the eval predictions
equal manual computations (flip TTA, full-resolution labels); `udajax.predict` writes them.

A small Cityscapes tree in the real layout (leftImg8bit/, gtFine/ with labelIds and
instanceIds) is built with `data_prep/build_datasets.py cityscapes --config=full` and a tiny
model trained on it; its `--format=cityscapes` predictions at the full label resolution are
scored by `cityscapesscripts`' evalPixelLevelSemanticLabeling (in a fresh process, found through
$CITYSCAPES_DATASET and $CITYSCAPES_RESULTS as users run it) and compared with udajax's own
full-resolution evaluation, class by class.
"""

import copy
import importlib
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from udajax import evaluation
from udajax import labels
from udajax import predict
from udajax import train_step as ts
from udajax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Cityscapes label ids with a train id (the 19 evaluated classes), and ids the evaluator ignores.
EVALUATED_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
INSTANCE_IDS = (24, 25, 26, 27, 28, 29, 30, 31, 32, 33)  # classes with instances (person..bicycle)
FIXTURE_SIZE = (64, 128)  # (H, W) of the fixture's images and labels


def write_cityscapes_tree(root, *, size=FIXTURE_SIZE, seed=0, cities=None, per_city=2,
                          absent_ids=(31,)):
  """A Cityscapes tree in the official layout; returns {gt label file: (H, W) uint8 label ids}.

  `cities`: {"train" | "val": city names}. Labels are blocks of random label ids 0..33 (every
  id the evaluator knows, ignored ones included), except `absent_ids`, which never occur (a
  class absent from the ground truth).
  Images colour each block by its id plus noise, so the labels can be learnt. instanceIds
  files (read by the evaluator for its instance-level scores) number the blocks of instance
  classes as id * 1000 + k, and hold the label id elsewhere, as the real files do.
  """
  cities = cities or {"train": ("aachen",), "val": ("frankfurt", "lindau")}
  rng = np.random.default_rng(seed)
  h, w = size
  ids = np.array([i for i in range(34) if i not in absent_ids])
  colors = rng.integers(0, 256, size=(34, 3))
  out = {}
  for split, split_cities in cities.items():
    for city in split_cities:
      for j in range(per_city):
        stem = f"{city}_{j:06d}_{19 + j:06d}"
        bh, bw = 8, 16
        small = rng.choice(ids, size=(h // bh, w // bw))
        # Some single pixels of another id: nearest resizing and ignore handling are exercised.
        label = np.repeat(np.repeat(small, bh, 0), bw, 1).astype(np.uint8)
        spots = rng.random((h, w)) < 0.03
        label[spots] = rng.choice(ids, size=int(spots.sum()))
        image = colors[label] + rng.normal(0, 12, size=(h, w, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        instances = label.astype(np.uint16)
        block = np.repeat(np.repeat(np.arange(small.size).reshape(small.shape), bh, 0), bw, 1)
        is_inst = np.isin(label, INSTANCE_IDS)
        instances[is_inst] = label[is_inst].astype(np.uint16) * 1000 + block[is_inst]
        img_dir = os.path.join(root, "leftImg8bit", split, city)
        gt_dir = os.path.join(root, "gtFine", split, city)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        Image.fromarray(image).save(os.path.join(img_dir, f"{stem}_leftImg8bit.png"))
        gt = os.path.join(gt_dir, f"{stem}_gtFine_labelIds.png")
        Image.fromarray(label).save(gt)
        Image.fromarray(instances).save(os.path.join(gt_dir, f"{stem}_gtFine_instanceIds.png"))
        out[gt] = label
  return out


def build_full(manual_dir, data_dir):
  """`python data_prep/build_datasets.py cityscapes --config=full` (in process)."""
  from data_prep import build_datasets
  (summary,) = build_datasets.main(["cityscapes", f"--manual_dir={manual_dir}", "--config=full",
                                    f"--data_dir={data_dir}", "--num_workers=1"])
  return summary


def official_evaluation(cityscapes_dir, results_dir, export_dir) -> dict:
  """Runs cityscapesscripts' evalPixelLevelSemanticLabeling the documented way, in a fresh process:
  the ground truth from $CITYSCAPES_DATASET/gtFine/val, predictions found in $CITYSCAPES_RESULTS.

  Only its instance-level score (nIoU, not compared here) is switched off: that part calls
  `np.in1d`, which numpy 2.4 removed. Returns its JSON result (classScores: IoU per class name in
  [0, 1], NaN when undefined; averageScoreClasses: their mean over the defined ones).
  """
  os.makedirs(export_dir, exist_ok=True)
  env = dict(os.environ, CITYSCAPES_DATASET=str(cityscapes_dir),
             CITYSCAPES_RESULTS=str(results_dir), CITYSCAPES_EXPORT_DIR=str(export_dir))
  code = ("import sys; sys.argv = sys.argv[:1]\n"
          "from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as m\n"
          "m.args.evalInstLevelScore = False\n"
          "m.main()\n")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout + proc.stderr
  with open(os.path.join(export_dir, "resultPixelLevelSemanticLabeling.json")) as f:
    return json.load(f)


# ------------------------------------------------------------------------------ a trained model


def tiny_config(data_dir, *, num_steps=40):
  """configs/demo.py's tiny DeepLab-v2, trained source-only on the fixture's train split; eval
  on its val split with the image at half size and the labels at full size (the full-resolution
  protocol, scaled down)."""
  c = importlib.import_module("configs.demo").get_config()
  c.data_dir = str(data_dir)
  c.model.base_width = 4
  h, w = FIXTURE_SIZE
  c.source.name = c.eval.name = "cityscapes"
  c.source.builder_config = c.eval.builder_config = "full"
  c.source.split = "train"
  c.source.image_size = (h // 2, w // 2)
  c.eval.split = "validation"
  c.eval.image_size = (h // 2, w // 2)
  c.eval.label_size = (h, w)
  c.eval.batch_size_per_device = 1
  c.eval.every_steps = num_steps
  c.eval.num_images_to_log = 0
  c.train.mode = "source_only"
  c.train.warmup_source_only_steps = 0
  c.train.num_steps = num_steps
  c.train.batch_size_per_device = 1
  c.train.lr = 2e-2
  c.train.augment = False
  c.train.log_every_steps = num_steps
  c.train.checkpoint_every_steps = num_steps
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(fixture root, config, workdir): the tree, its full-size TFDS build, a trained tiny model."""
  root = tmp_path_factory.mktemp("parity")
  write_cityscapes_tree(root / "cityscapes")
  build_full(root / "cityscapes", root / "tfds")
  config = tiny_config(root / "tfds")
  workdir = str(root / "work")
  trainer.train_and_evaluate(copy.deepcopy(config), workdir)
  return root, config, workdir


def _cli(module, *args, timeout=300):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, check=False,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def _config_flags(config):
  """Command-line overrides that turn configs/demo.py into `config`."""
  keys = ["data_dir", "model.base_width", "source.name", "source.builder_config",
          "source.image_size", "eval.name", "eval.builder_config", "eval.split",
          "eval.image_size", "eval.label_size", "eval.batch_size_per_device", "train.mode",
          "eval.flip"]
  out = ["--config=" + os.path.join(ROOT, "configs", "demo.py")]
  for key in keys:
    node = config
    for part in key.split("."):
      node = node[part]
    value = f"({node[0]}, {node[1]})" if isinstance(node, tuple) else node
    out.append(f"--config.{key}={value}")
  return out


def test_evaluate_equals_the_official_cityscapes_evaluator(trained, tmp_path):
  root, config, workdir = trained
  out_json = tmp_path / "summary.json"
  _cli("udajax.evaluate", *_config_flags(config), f"--checkpoint={workdir}",
       f"--output_json={out_json}")
  ours = json.loads(out_json.read_text())
  predict.predict_checkpoint(copy.deepcopy(config), workdir, str(tmp_path / "pred"), "cityscapes",
                             progress=False)
  official = official_evaluation(root / "cityscapes", tmp_path / "pred", tmp_path / "export")

  names = labels.CITYSCAPES_CLASSES
  theirs = official["classScores"]
  print(f"\nmIoU: udajax {ours['mIoU']:.6f}, official {100 * official['averageScoreClasses']:.6f}")
  for name in names:
    mine = ours[f"IoU/{name}"]
    print(f"  {name:<14} udajax {mine}  official {100 * theirs[name]}")
    if mine is None:  # a class absent from labels and predictions: excluded by both
      assert np.isnan(theirs[name]), name
    else:
      assert abs(mine / 100 - theirs[name]) <= 1e-6, (name, mine, theirs[name])
  assert abs(ours["mIoU"] / 100 - official["averageScoreClasses"]) <= 1e-6
  # The fixture makes this comparison meaningful: several classes are learnt (IoU > 0), the
  # class absent from the ground truth ("train") is excluded, and every val image was scored.
  assert sum(1 for n in names if (ours[f"IoU/{n}"] or 0) > 0) >= 5
  assert ours["IoU/train"] is None or ours["IoU/train"] == 0.0
  assert ours["num_images"] == 4 and ours["step"] == config.train.num_steps
  assert len(os.listdir(tmp_path / "pred")) == 4


# ------------------------------------------------------------------------------ manual references


def _eval_predictions(config, variables, with_names=False):
  """What evaluation scores: (predictions (N, Hl, Wl), network inputs (N, H, W, 3)[, stored file
  names (N,)]) of the eval set, from the eval step over the eval batches (padding dropped)."""
  rep = flax.jax_utils.replicate(variables)
  preds, images, names = [], [], []
  for batch, _, pred in evaluation.eval_outputs(config, ts.make_p_eval_step(config),
                                                rep["params"], rep["batch_stats"]):
    mask = np.asarray(batch["mask"]).reshape(-1)
    preds.append(np.asarray(pred).reshape((-1,) + pred.shape[2:])[mask])
    images.append(np.asarray(batch["image"]).reshape((-1,) + batch["image"].shape[2:])[mask])
    names += [n.decode() for n in np.asarray(batch["file_name"]).reshape(-1)[mask]]
  out = (np.concatenate(preds), np.concatenate(images))
  return out + (names,) if with_names else out


def _network_logits(config, variables, images):
  """(N, h, w, C) eval-mode logits of the network alone (no resizing, no flipping)."""
  model = ts.create_model(config, axis_name=None)
  return np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False)[0])(images),
                    np.float32)


def _torch_upsample(logits, size, align_corners=True):
  """(N, h, w, C) -> (N, H, W, C) with PyTorch's bilinear interpolation (the reference's)."""
  import torch
  x = torch.from_numpy(np.array(logits, np.float32)).permute(0, 3, 1, 2)  # a writable copy
  y = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear",
                                      align_corners=align_corners)
  return y.permute(0, 2, 3, 1).numpy()


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _assert_argmax_equal(pred, scores):
  """pred == argmax(scores) except at exact ties: a differing pixel must have its two best
  scores within float32 rounding (and such pixels must be rare)."""
  manual = scores.argmax(-1)
  differ = pred != manual
  top2 = np.sort(scores, axis=-1)[..., -2:]
  margin = top2[..., 1] - top2[..., 0]
  assert differ.mean() <= 1e-3, differ.mean()
  assert np.all(margin[differ] <= 1e-5 * np.abs(top2[..., 1][differ]).clip(1)), margin[differ]


def test_flip_tta_equals_manual_computation(trained):
  _, config, workdir = trained
  config = copy.deepcopy(config)
  config.eval.flip = True
  variables, _ = evaluation.load_checkpoint_variables(config, workdir)
  pred, images = _eval_predictions(config, variables)
  size = tuple(config.eval.label_size)
  assert pred.shape == (4,) + size

  # Manual: mirror the image, forward, mirror the logits back; upsample both to the label size;
  # average the two softmaxes; argmax.
  logits = _network_logits(config, variables, images)
  mirrored_back = _network_logits(config, variables, images[:, :, ::-1])[:, :, ::-1]
  probs = 0.5 * (_softmax(_torch_upsample(logits, size)) +
                 _softmax(_torch_upsample(mirrored_back, size)))
  _assert_argmax_equal(pred, probs)

  # The test can see the plausible bugs: no flip at all, or the mirrored logits not mirrored back.
  plain = _torch_upsample(logits, size).argmax(-1)
  not_back = 0.5 * (_softmax(_torch_upsample(logits, size)) +
                    _softmax(_torch_upsample(mirrored_back[:, :, ::-1], size)))
  assert (pred != plain).mean() > 0.01
  assert (pred != not_back.argmax(-1)).mean() > 0.01


def test_full_resolution_labels_equal_manual_upsampling(trained):
  _, config, workdir = trained
  variables, _ = evaluation.load_checkpoint_variables(copy.deepcopy(config), workdir)
  pred, images = _eval_predictions(config, variables)
  size = tuple(config.eval.label_size)
  assert pred.shape == (4,) + size and images.shape[1:3] == tuple(config.eval.image_size)
  logits = _network_logits(config, variables, images)
  # The network's logits are at its input size (its own upsampling of the stride-8 head).
  assert logits.shape[1:3] == tuple(config.eval.image_size) != size
  # Manual: align-corners bilinear upsampling of the logits to the label size, then argmax.
  _assert_argmax_equal(pred, _torch_upsample(logits, size))
  # A half-pixel-centre upsampling (align_corners=False) gives other labels: the test sees it.
  assert (pred != _torch_upsample(logits, size, align_corners=False).argmax(-1)).mean() > 0.01


# ------------------------------------------------------------------------------ predictions


LABEL_ID_OF_TRAIN_ID = np.array(EVALUATED_IDS, np.uint8)  # the fixture's own table, not udajax's
PALETTE = np.array([(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
                    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)
MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)


def _read(path):
  with Image.open(path) as im:
    return np.asarray(im)


def test_predict_formats_hold_the_evaluated_predictions(trained, tmp_path):
  root, config, workdir = trained
  variables, _ = evaluation.load_checkpoint_variables(copy.deepcopy(config), workdir)
  pred, _, names = _eval_predictions(config, variables, with_names=True)
  for fmt in predict.FORMATS:
    result = predict.predict_checkpoint(copy.deepcopy(config), workdir, str(tmp_path / fmt), fmt,
                                        progress=False)
    assert result["num_images"] == 4 and result["step"] == config.train.num_steps
  for i, name in enumerate(names):  # e.g. leftImg8bit/val/lindau/lindau_000001_000020_...png
    base = os.path.basename(name)
    trainid = _read(tmp_path / "trainid" / base)
    np.testing.assert_array_equal(trainid, pred[i])
    np.testing.assert_array_equal(_read(tmp_path / "cityscapes" / base),
                                  LABEL_ID_OF_TRAIN_ID[pred[i]])
    color = _read(tmp_path / "color" / base)
    np.testing.assert_array_equal(color, PALETTE[pred[i]])
    # overlay = (image + colour) / 2, the image being this file's own picture at label size.
    blended_image = 2.0 * _read(tmp_path / "overlay" / base) - color
    original = _read(root / "cityscapes" / name).astype(np.float32)
    other = _read(root / "cityscapes" / names[(i + 1) % len(names)]).astype(np.float32)
    assert np.abs(blended_image - original).mean() < 0.5 * np.abs(blended_image - other).mean()
  assert sorted(os.listdir(tmp_path / "cityscapes")) == sorted(os.path.basename(n) for n in names)


def test_predict_image_files_at_their_own_size(trained, tmp_path, capsys):
  root, config, workdir = trained
  sources = sorted((root / "cityscapes" / "leftImg8bit" / "val").glob("*/*.png"))[:2]
  folder = tmp_path / "frames"
  folder.mkdir()
  for k, src in enumerate(sources):
    Image.open(src).save(folder / f"frame_{k}.png")
  Image.open(sources[0]).resize((100, 48), Image.BILINEAR).save(folder / "photo.jpg", quality=95)
  result = predict.predict_checkpoint(copy.deepcopy(config), workdir, str(tmp_path / "out"),
                                      "trainid", images=str(folder / "*"))
  assert result["num_images"] == 3
  assert "3/3 images" in capsys.readouterr().err  # the progress bar

  variables, _ = evaluation.load_checkpoint_variables(copy.deepcopy(config), workdir)
  h, w = config.eval.image_size
  for name in ("frame_0", "frame_1", "photo"):
    src = next(folder.glob(name + ".*"))
    original = np.asarray(Image.open(src).convert("RGB"))
    pred = _read(tmp_path / "out" / f"{name}.png")
    assert pred.shape == original.shape[:2]
    # Manual: PIL bicubic resize to the network size, normalise, forward, upsample the logits
    # (align corners) to the image's own size, argmax.
    small = np.asarray(Image.fromarray(original).resize((w, h), Image.BICUBIC), np.float32)
    logits = _network_logits(config, variables, (small[..., ::-1] - MEAN_BGR)[None])
    _assert_argmax_equal(pred[None], _torch_upsample(logits, original.shape[:2]))

  predict.predict_checkpoint(copy.deepcopy(config), workdir, str(tmp_path / "overlay"), "overlay",
                             images=str(folder / "*.jpg"), progress=False)
  assert os.listdir(tmp_path / "overlay") == ["photo.png"]
  photo = np.asarray(Image.open(folder / "photo.jpg").convert("RGB"), np.float32)
  color = PALETTE[_read(tmp_path / "out" / "photo.png")].astype(np.float32)
  blend = _read(tmp_path / "overlay" / "photo.png").astype(np.float32)
  assert np.abs(blend - (photo + color) / 2).max() <= 0.5
