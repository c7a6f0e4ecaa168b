"""`python -m udajax.predict`: the PNG writers (ids, palette, overlay, names) and the command."""

import copy
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import train_cli
from udajax import labels
from udajax import predict
from udajax import prediction_formats as formats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Written out here on purpose (not derived from udajax.labels): Cityscapes label id of each
# train id, and the train ids a 16-class (SYNTHIA) model predicts, in its class order.
LABEL_ID_OF_TRAIN_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
TRAIN_IDS_16 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]


# ------------------------------------------------------------------------------ writers


def test_label_ids_19_and_16_classes():
  pred = np.arange(19).reshape(1, 19)
  np.testing.assert_array_equal(formats.to_label_ids(pred, 19), [LABEL_ID_OF_TRAIN_ID])
  np.testing.assert_array_equal(formats.to_train_ids(pred, 19), pred)
  pred16 = np.arange(16).reshape(4, 4)
  expected_train = np.array(TRAIN_IDS_16).reshape(4, 4)
  np.testing.assert_array_equal(formats.to_train_ids(pred16, 16), expected_train)
  np.testing.assert_array_equal(formats.to_label_ids(pred16, 16),
                                np.array(LABEL_ID_OF_TRAIN_ID)[expected_train])
  # A 16-class model never writes terrain (22), truck (27) or train (31).
  assert not set(formats.to_label_ids(pred16, 16).ravel()) & {22, 27, 31}
  assert formats.to_label_ids(pred16, 16).dtype == np.uint8
  with pytest.raises(ValueError, match=r"\[0, 16\)"):
    formats.to_label_ids(np.array([[16]]), 16)
  with pytest.raises(ValueError, match="19 or 16"):
    formats.to_label_ids(np.array([[0]]), 13)


def test_color_and_overlay():
  pred = np.array([[0, 10], [13, 18]])  # road, sky, car, bicycle
  color = formats.to_color(pred, 19)
  assert color.dtype == np.uint8 and color.shape == (2, 2, 3)
  np.testing.assert_array_equal(color, [[(128, 64, 128), (70, 130, 180)],
                                        [(0, 0, 142), (119, 11, 32)]])
  # 16 classes: index 9 is sky, 13 bus, 15 bicycle.
  np.testing.assert_array_equal(formats.to_color(np.array([[9, 13, 15]]), 16),
                                [[(70, 130, 180), (0, 60, 100), (119, 11, 32)]])
  image = np.array([[(100, 0, 255), (1, 2, 3)], [(255, 255, 255), (0, 0, 0)]], np.uint8)
  blend = formats.overlay(image, pred, 19)
  # round(0.5 * image + 0.5 * colour), halves rounded to even as numpy does.
  np.testing.assert_array_equal(blend, [[(114, 32, 192), (36, 66, 92)],
                                        [(128, 128, 198), (60, 6, 16)]])
  np.testing.assert_array_equal(formats.overlay(image, pred, 19, alpha=1.0), color)
  np.testing.assert_array_equal(formats.overlay(image, pred, 19, alpha=0.0), image)
  with pytest.raises(ValueError, match="sizes differ"):
    formats.overlay(image[:1], pred, 19)


def test_render_formats():
  pred = np.array([[0, 1, 2], [16, 17, 18]])
  image = np.full((2, 3, 3), 50, np.uint8)
  out = {fmt: formats.render(pred, fmt, 19, image=image) for fmt in formats.FORMATS}
  np.testing.assert_array_equal(out["cityscapes"], [[7, 8, 11], [31, 32, 33]])
  np.testing.assert_array_equal(out["trainid"], pred)
  assert out["color"].shape == (2, 3, 3) and out["overlay"].shape == (2, 3, 3)
  with pytest.raises(ValueError, match="overlay format needs the image"):
    formats.render(pred, "overlay", 19)
  with pytest.raises(ValueError, match="unknown format"):
    formats.render(pred, "labelids", 19)


def test_output_names_match_the_official_evaluator():
  from cityscapesscripts.helpers import csHelpers
  name = formats.output_name(b"leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png")
  assert name == "frankfurt_000000_000294_leftImg8bit.png"
  info = csHelpers.getCsFileInfo(name)
  assert (info.city, info.sequenceNb, info.frameNb) == ("frankfurt", "000000", "000294")
  assert formats.output_name("images/00017.png") == "00017.png"
  assert formats.output_name("/data/video/frame 0001.jpg") == "frame 0001.png"
  assert formats.output_name("target/validation/00002.png") == "00002.png"
  with pytest.raises(predict.PredictInputError):
    formats.output_name("folder/")


def test_write_png_round_trip(tmp_path):
  ids = np.array([[7, 8], [33, 0]], np.uint8)
  formats.write_png(str(tmp_path / "a.png"), ids)
  with Image.open(tmp_path / "a.png") as im:
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), ids)
  rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  formats.write_png(str(tmp_path / "b.png"), rgb)
  with Image.open(tmp_path / "b.png") as im:
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), rgb)
  assert os.path.getsize(tmp_path / "a.png") > 0


def test_image_files_listing_and_reading(tmp_path):
  from tests import fake_data
  Image.fromarray(np.full((6, 10, 3), 7, np.uint8)).save(tmp_path / "a.png")
  (tmp_path / "sub").mkdir()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "sub" / "b.png")  # grey: as RGB
  assert predict.list_images(str(tmp_path / "**" / "*.png")) == [str(tmp_path / "a.png"),
                                                                  str(tmp_path / "sub" / "b.png")]
  assert predict.read_image(str(tmp_path / "sub" / "b.png")).shape == (4, 4, 3)
  assert predict.check_images([str(tmp_path / "a.png")]) == {str(tmp_path / "a.png"): (6, 10)}
  with pytest.raises(predict.PredictInputError, match="matches no files"):
    predict.list_images(str(tmp_path / "*.jpg"))
  # Same output name from two folders: refused before any computation.
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "sub" / "a.jpg")
  with pytest.raises(predict.PredictInputError, match="would both be written as a.png"):
    predict.check_images(predict.list_images(str(tmp_path / "**" / "a.*")))
  # A truncated file passes the header check but not the decoding; both name the file.
  big = tmp_path / "big.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(big)
  fake_data.corrupt_png(str(big))
  with pytest.raises(predict.PredictInputError, match=f"cannot read image {big}"):
    predict.read_image(str(big))


# ------------------------------------------------------------------------------ the command


def _run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "udajax.predict", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, check=False,
                        env=train_cli.env())


def _overrides(values):
  """{"eval.image_size": (32, 64), ...} -> ["--config.eval.image_size=(32, 64)", ...]."""
  return [f"--config.{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
  return train_cli.demo_data_dir(tmp_path_factory)


@pytest.mark.parametrize("case", ["missing checkpoint", "dataset not built", "empty glob",
                                  "unreadable image", "bad flag"])
def test_user_errors_are_one_line(case, demo_data_dir, tmp_path):
  args = ["--config=configs/demo.py", f"--config.data_dir={demo_data_dir}",
          f"--output={tmp_path / 'out'}", f"--checkpoint={tmp_path / 'no_such_run'}"]
  if case == "dataset not built":
    # The checkpoint must exist (an empty folder): a missing one is reported first.
    args += [f"--config.data_dir={tmp_path / 'empty'}", "--config.eval.name=cityscapes",
             "--config.eval.builder_config=full", f"--checkpoint={tmp_path}"]
    expect = "python data_prep/build_datasets.py cityscapes"
  elif case == "empty glob":
    args.append(f"--images={tmp_path / 'frames' / '*.png'}")
    expect = "matches no files"
  elif case == "unreadable image":
    (tmp_path / "frames").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "frames" / "a.png")
    (tmp_path / "frames" / "b.png").write_text("not an image")
    args.append(f"--images={tmp_path / 'frames' / '*.png'}")
    expect = f"cannot read image {tmp_path / 'frames' / 'b.png'}"
  elif case == "bad flag":
    args.append("--format=labelids")
    expect = "--format=labelids: value should be one of <cityscapes|trainid|color|overlay>"
  else:
    expect = "no_such_run does not exist"
  proc = _run_cli(*args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  (line,) = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
  assert expect in line, line
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_synthia_16_classes_end_to_end(tmp_path):
  """SYNTHIA -> Cityscapes with 16 classes on the fixture trees: train a few steps (the
  source-only stage, as configs/synthia_source.py; its compilation is the cheapest), evaluate on
  Cityscapes (mIoU over the 16 classes and mIoU13), predict Cityscapes label ids from the command
  line."""
  from data_prep import build_datasets
  from tests import fake_data
  from tests.test_evaluation_parity import FIXTURE_SIZE, build_full, write_cityscapes_tree
  from udajax import evaluation
  from udajax import trainer
  h, w = FIXTURE_SIZE
  fake_data.write_synthia(tmp_path / "synthia", n=4, size=(w, h))
  write_cityscapes_tree(tmp_path / "cityscapes")
  data_dir = tmp_path / "tfds"
  build_datasets.main(["synthia", f"--manual_dir={tmp_path / 'synthia'}", "--config=full",
                       f"--data_dir={data_dir}", "--num_workers=1"])
  build_full(tmp_path / "cityscapes", data_dir)
  small = (h // 2, w // 2)
  values = {
      "data_dir": str(data_dir), "num_classes": 16, "model.base_width": 4,
      "source.name": "synthia", "source.builder_config": "full", "source.image_size": small,
      "target.name": "cityscapes", "target.builder_config": "full", "target.image_size": small,
      "eval.name": "cityscapes", "eval.builder_config": "full", "eval.image_size": small,
      "eval.label_size": (h, w), "eval.batch_size_per_device": 1, "eval.num_images_to_log": 0,
  }
  train = {"train.mode": "source_only", "train.warmup_source_only_steps": 0,
           "train.num_steps": 3, "train.batch_size_per_device": 1, "train.log_every_steps": 3,
           "train.checkpoint_every_steps": 3, "eval.every_steps": 3}
  config = importlib.import_module("configs.demo").get_config()
  for key, value in {**values, **train}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  workdir = str(tmp_path / "work")
  trainer.train_and_evaluate(copy.deepcopy(config), workdir)

  result = evaluation.evaluate_checkpoint(copy.deepcopy(config), workdir)
  names16 = [labels.CITYSCAPES_CLASSES[t] for t in TRAIN_IDS_16]
  assert {k for k in result if k.startswith("IoU/")} == {f"IoU/{n}" for n in names16}
  iou = {n: result[f"IoU/{n}"] for n in names16}
  assert result["mIoU"] == pytest.approx(np.nanmean(list(iou.values())))
  thirteen = [iou[n] for n in names16 if n not in ("wall", "fence", "pole")]
  assert len(thirteen) == 13
  assert result["mIoU13"] == pytest.approx(np.nanmean(thirteen))
  assert result["num_images"] == 4 and result["step"] == 3

  proc = _run_cli("--config=configs/demo.py", *_overrides(values), f"--checkpoint={workdir}",
                  f"--output={tmp_path / 'pred'}", "--format=cityscapes")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "4 predictions (cityscapes)" in proc.stdout and "(step 3)" in proc.stdout
  files = sorted(os.listdir(tmp_path / "pred"))
  assert len(files) == 4 and all(f.endswith("_leftImg8bit.png") for f in files)
  allowed = {LABEL_ID_OF_TRAIN_ID[t] for t in TRAIN_IDS_16}
  for f in files:
    ids = np.asarray(Image.open(tmp_path / "pred" / f))
    assert ids.shape == (h, w) and set(np.unique(ids)) <= allowed
