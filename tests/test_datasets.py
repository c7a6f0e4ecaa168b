"""TFDS builders on small fake trees in the real layouts: decoded train ids pixel by pixel,
label-size mismatches, zips, corrupt files, the skip flag, and the procedural demo."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import fake_data
from udajax import datasets

tfds.disable_progress_bar()


def _build(name, config, data_dir, manual_dir, **kwargs):
  builder = datasets.get_builder(name, config, str(data_dir), num_workers=2, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _examples(builder, split="train"):
  out = {}
  for ex in builder.as_data_source(split):
    fn = ex["file_name"]
    out[fn.decode() if isinstance(fn, bytes) else fn] = ex
  return out


def test_gta5_palette_labels_and_size_mismatch(tmp_path):
  expected = fake_data.write_gta5(tmp_path / "gta5", n=4, mismatch=(1, 3))
  builder = _build("gta5", "full", tmp_path / "data", tmp_path / "gta5")
  examples = _examples(builder)
  assert sorted(examples) == sorted(expected)
  for fn, ex in examples.items():
    assert ex["label"].shape[-1] == 1
    np.testing.assert_array_equal(ex["label"][..., 0], expected[fn], err_msg=fn)
    original = np.asarray(Image.open(tmp_path / "gta5" / fn).convert("RGB"))
    np.testing.assert_array_equal(ex["image"], original)
  assert builder.build_stats.as_dict() == {"train": {"examples": 4, "label_resized": 2}}
  assert builder.info.metadata["train"]["label_resized"] == 2


def test_gta5_resized_config(tmp_path):
  expected = fake_data.write_gta5(tmp_path / "gta5", n=2, mismatch=(1,))
  builder = _build("gta5", "1280x720", tmp_path / "data", tmp_path / "gta5")
  for fn, ex in _examples(builder).items():
    assert ex["image"].shape == (720, 1280, 3)
    src = Image.open(tmp_path / "gta5" / fn).convert("RGB")
    np.testing.assert_array_equal(ex["image"], np.asarray(src.resize((1280, 720), Image.BICUBIC)))
    if fn == "images/00001.png":  # matching sizes: nearest of the mapped label
      np.testing.assert_array_equal(ex["label"][..., 0],
                                    fake_data.pil_nearest(expected[fn], (1280, 720)))
    assert set(np.unique(ex["label"])) <= set(range(19)) | {255}


def test_synthia_16bit_labels(tmp_path):
  expected = fake_data.write_synthia(tmp_path / "syn", n=3, channels=3)
  builder = _build("synthia", "full", tmp_path / "data", tmp_path / "syn")
  examples = _examples(builder)
  assert sorted(examples) == sorted(expected)
  for fn, ex in examples.items():
    np.testing.assert_array_equal(ex["label"][..., 0], expected[fn], err_msg=fn)
  # Every mapped SYNTHIA class occurs, so the whole id table is exercised.
  seen = set(np.unique(np.concatenate([e.ravel() for e in expected.values()])))
  assert len(seen - {255}) >= 15


def test_synthia_manual_dir_is_rand_cityscapes_and_4_channels(tmp_path):
  expected = fake_data.write_synthia(tmp_path / "syn", n=2, channels=4, seed=5)
  builder = _build("synthia", "full", tmp_path / "data", tmp_path / "syn" / "RAND_CITYSCAPES")
  examples = _examples(builder)
  for fn, ex in examples.items():
    np.testing.assert_array_equal(ex["label"][..., 0], expected["RAND_CITYSCAPES/" + fn],
                                  err_msg=fn)


@pytest.mark.parametrize("as_zip", [False, True])
def test_cityscapes_two_cities(tmp_path, as_zip):
  expected = fake_data.write_cityscapes(tmp_path / "cs", as_zip=as_zip)
  builder = _build("cityscapes", "full", tmp_path / "data", tmp_path / "cs")
  for split in ("train", "validation"):
    examples = _examples(builder, split)
    assert sorted(examples) == sorted(expected[split])
    for fn, ex in examples.items():
      np.testing.assert_array_equal(ex["label"][..., 0], expected[split][fn], err_msg=fn)
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.splits["validation"].num_examples == 2


def test_corrupt_image_fails_naming_path(tmp_path):
  fake_data.write_gta5(tmp_path / "gta5", n=3)
  bad = tmp_path / "gta5" / "images" / "00002.png"
  fake_data.corrupt_png(bad)
  with pytest.raises(datasets.CorruptFileError, match="00002.png") as info:
    _build("gta5", "full", tmp_path / "data", tmp_path / "gta5")
  assert str(bad) in str(info.value)
  assert "--skip_corrupt" in str(info.value)


def test_corrupt_16bit_label_fails_naming_path(tmp_path):
  fake_data.write_synthia(tmp_path / "syn", n=2)
  bad = tmp_path / "syn" / "RAND_CITYSCAPES" / "GT" / "LABELS" / "0000001.png"
  fake_data.corrupt_png(bad, keep=0.3)
  with pytest.raises(datasets.CorruptFileError) as info:
    _build("synthia", "full", tmp_path / "data", tmp_path / "syn")
  assert str(bad) in str(info.value)


def test_skip_corrupt_reports_count(tmp_path):
  expected = fake_data.write_gta5(tmp_path / "gta5", n=4, mismatch=())
  fake_data.corrupt_png(tmp_path / "gta5" / "labels" / "00003.png")
  os.remove(tmp_path / "gta5" / "labels" / "00004.png")  # a missing label counts as unreadable
  builder = _build("gta5", "full", tmp_path / "data", tmp_path / "gta5", skip_corrupt=True)
  assert builder.build_stats.as_dict()["train"] == {"examples": 2, "skipped": 2}
  assert len(builder.build_stats.skipped_files) == 2
  assert any("00003.png" in s for s in builder.build_stats.skipped_files)
  assert sorted(_examples(builder)) == sorted(expected)[:2]


def test_missing_manual_dir_gives_instructions(tmp_path):
  (tmp_path / "wrong").mkdir()
  (tmp_path / "wrong" / "README").write_text("not GTA5")
  with pytest.raises(FileNotFoundError, match="no gta5 train images found(.|\n)*download"):
    _build("gta5", "full", tmp_path / "data", tmp_path / "wrong")


def test_folder_check_without_tensorflow_agrees_with_tfds(tmp_path, monkeypatch):
  """`udajax.dataset_paths` (the command-line tools' check before TensorFlow is imported) finds
  the data directory where TFDS does, fails for a missing dataset folder with the message
  `load_builder` gives for a missing version, and leaves URL data directories to TFDS."""
  from pathlib import Path

  from udajax import dataset_paths
  assert dataset_paths.data_dir_root(None) == str(Path(tfds.core.constants.DATA_DIR).expanduser())
  assert (dataset_paths.data_dir_root(None)
          == str(datasets.get_builder("cityscapes", "1024x512").data_dir_root))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
  assert dataset_paths.data_dir_root(None) == str(tmp_path / "env")
  assert dataset_paths.data_dir_root(str(tmp_path)) == str(tmp_path)

  with pytest.raises(datasets.DatasetNotBuiltError) as quick:
    dataset_paths.require_folder("cityscapes", "1024x512", str(tmp_path))
  (tmp_path / "cityscapes" / "1024x512").mkdir(parents=True)  # a folder without the version
  dataset_paths.require_folder("cityscapes", "1024x512", str(tmp_path))
  with pytest.raises(datasets.DatasetNotBuiltError) as full:
    datasets.load_builder("cityscapes", "1024x512", str(tmp_path))
  folder = tmp_path / "cityscapes" / "1024x512"
  assert str(quick.value) == str(full.value).replace(f"{folder}/1.0.0", str(folder))
  assert "Build it with:\n  python data_prep/build_datasets.py cityscapes" in str(quick.value)
  dataset_paths.require_folder("gta5", "full", "gs://bucket/tensorflow_datasets")  # not checked

  # A leading ~ is the home folder for the check and for the builders alike; "" is unset.
  home = os.path.expanduser("~")
  assert dataset_paths.data_dir_root("~/tfds") == os.path.join(home, "tfds")
  assert (str(datasets.get_builder("cityscapes", "1024x512", "~/tfds").data_dir_root)
          == os.path.join(home, "tfds"))
  assert dataset_paths.data_dir_root("") == str(tmp_path / "env")


def test_dataset_names_and_builder_configs_are_config_errors():
  """The TensorFlow-free table of builder configs is the builders' own; a misspelt dataset name
  or builder config is a config error naming the key and the choices, checked before the
  dataset folder."""
  import ml_collections

  from udajax import dataset_paths
  from udajax.errors import ConfigError
  assert set(dataset_paths.BUILDER_CONFIGS) == set(datasets.DATASET_NAMES)
  for name, configs in dataset_paths.BUILDER_CONFIGS.items():
    assert configs == datasets.config_names(name), name
  c = ml_collections.ConfigDict({"data_dir": "/nonexistent",
                                 "eval": {"name": "cityscapes", "builder_config": "1024x51"},
                                 "source": {"name": "cityscape", "builder_config": "full"}})
  with pytest.raises(ConfigError, match=r"'eval.builder_config' = '1024x51'.*\('full', "
                     r"'1024x512'\)"):
    dataset_paths.require_built(c)
  with pytest.raises(ConfigError, match=r"'source.name' = 'cityscape': not a udajax dataset"):
    dataset_paths.require_built(c, ("source", "eval"))


def test_not_built_error_names_command(tmp_path):
  with pytest.raises(datasets.DatasetNotBuiltError) as info:
    datasets.load_builder("cityscapes", "1024x512", str(tmp_path))
  msg = str(info.value)
  assert "python data_prep/build_datasets.py cityscapes" in msg and "--config=1024x512" in msg
  with pytest.raises(ValueError, match="1024x512"):
    datasets.get_builder("cityscapes", "512x256", str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Demo


def test_demo_is_deterministic_and_in_train_id_space():
  from udajax.datasets import demo
  for domain in ("source", "target"):
    a_img, a_lbl = demo.generate(domain, "train", 7)
    b_img, b_lbl = demo.generate(domain, "train", 7)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lbl, b_lbl)
    assert a_img.shape == (96, 192, 3) and a_img.dtype == np.uint8
    assert a_lbl.shape == (96, 192) and set(np.unique(a_lbl)) <= set(demo.DEMO_CLASSES)
  assert not np.array_equal(demo.generate("source", "train", 0)[1],
                            demo.generate("source", "validation", 0)[1])


def test_demo_shift_is_appearance_not_layout():
  """Class frequencies match across domains; per-class colours do not (a colour classifier fitted
  on the source does much worse on the target)."""
  from udajax.datasets import demo
  def pixels(domain, n):
    xs, ys = zip(*(demo.generate(domain, "train", i) for i in range(n)))
    return (np.concatenate([x.reshape(-1, 3) for x in xs]).astype(np.float32),
            np.concatenate([y.ravel() for y in ys]))
  xs, ys = pixels("source", 40)
  xt, yt = pixels("target", 40)
  fs = np.bincount(ys, minlength=19) / ys.size
  ft = np.bincount(yt, minlength=19) / yt.size
  assert np.abs(fs - ft).sum() < 0.15  # same layout statistics
  classes = np.unique(ys)
  means = np.stack([xs[ys == c].mean(0) for c in classes])
  def acc(x, y):
    return (classes[((x[:, None] - means[None]) ** 2).sum(-1).argmin(1)] == y).mean()
  assert acc(xs, ys) > 0.75
  assert acc(xt, yt) < 0.6 * acc(xs, ys)


def test_demo_builder_small(tmp_path):
  builder = datasets.get_builder("udajax_demo", "target", str(tmp_path),
                                 sizes={"train": 4, "validation": 3})
  builder.download_and_prepare()
  from udajax.datasets import demo
  examples = _examples(builder, "validation")
  assert len(examples) == 3
  img, lbl = demo.generate("target", "validation", 2)
  ex = examples["target/validation/00002.png"]
  np.testing.assert_array_equal(ex["image"], img)
  np.testing.assert_array_equal(ex["label"][..., 0], lbl)


def test_build_cli_summary(tmp_path, capsys):
  from data_prep import build_datasets
  fake_data.write_gta5(tmp_path / "gta5", n=3, mismatch=(0,))
  fake_data.corrupt_png(tmp_path / "gta5" / "images" / "00003.png")
  argv = ["gta5", f"--manual_dir={tmp_path / 'gta5'}", "--config=full",
          f"--data_dir={tmp_path / 'data'}"]
  with pytest.raises(SystemExit) as e:
    build_datasets.main(argv)
  assert e.value.code == 2 and "00003.png" in capsys.readouterr().err
  (summary,) = build_datasets.main(argv + ["--skip_corrupt", "--num_workers=1"])
  assert summary["splits"] == {"train": 2}
  assert summary["skipped"] == {"train": 1} and summary["label_resized"] == {"train": 1}
  assert summary["bytes"] > 0
  out = capsys.readouterr().out
  assert "2 examples written, 1 files skipped" in out and "00003.png" in out
  (again,) = build_datasets.main(argv)  # already built: reports the stored counts
  assert again["skipped"] == {"train": 1}
