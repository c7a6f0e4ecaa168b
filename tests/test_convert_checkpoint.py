"""data_prep/convert_torch_checkpoint.py: every key layout users have, errors, and the CLI.

Tiny nets (stage_blocks=(1, 2, 1, 1), base_width=8; vgg_width=4) keep this fast; the full-depth
numerical comparisons live in tests/test_models.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from data_prep import convert_torch_checkpoint as conv
from tests import torch_reference_models as tref
from udajax.checkpoints import load_variables
from udajax.models import DeepLabV2

BLOCKS = (1, 2, 1, 1)
WIDTH = 8
TINY = dict(stage_blocks=BLOCKS, base_width=WIDTH)


def relerr(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def torch_eval(model, x):
  model.eval()
  with torch.no_grad():
    logits, feats = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
  return logits.numpy().transpose(0, 2, 3, 1), feats.numpy().transpose(0, 2, 3, 1)


def tree_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (_, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def tiny_resnet():
  return tref.randomize_(tref.TorchDeepLabResNet(6, BLOCKS, WIDTH), seed=11)


@pytest.fixture(scope="module")
def tiny_apply():
  return jax.jit(DeepLabV2(6, **TINY).apply)


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).randn(2, 57, 43, 3).astype(np.float32) * 40


def test_reference_layout_with_layer5_and_layer6(tiny_resnet, tiny_apply, images, tmp_path):
  path = tref.save_layout(tiny_resnet, str(tmp_path / "ref.pth"), "reference")
  raw = torch.load(path, weights_only=False)
  assert "module.layer5.conv2d_list.0.weight" in raw["state_dict"]
  assert "module.bn1.num_batches_tracked" in raw["state_dict"]
  variables, info = conv.convert_checkpoint_with_info(path, "resnet101", num_classes=6, **TINY)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "classifier"}
  assert set(variables["params"]["classifier"]) == {"conv0", "conv1"}
  assert info["classifier"] and info["num_classes"] == 6
  assert any(k.startswith("layer5.") for k in info["dropped"])
  assert "layer6.conv2d_list.3.weight" in info["dropped"]
  w = tiny_resnet.layer2[0].conv2.weight.detach().numpy()
  np.testing.assert_array_equal(
      variables["params"]["backbone"]["layer2"]["block0"]["conv2"]["kernel"],
      w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["bn1"]["var"],
                                tiny_resnet.bn1.running_var.numpy())
  logits, feats = tiny_apply(variables, jnp.asarray(images))
  ref_logits, ref_feats = torch_eval(tiny_resnet, images)
  assert relerr(logits, ref_logits) < 1e-4 and relerr(feats, ref_feats) < 1e-4


def test_imagenet_scale_layout_has_no_classifier(tiny_resnet, tiny_apply, images, tmp_path):
  path = tref.save_layout(tiny_resnet, str(tmp_path / "init.pth"), "scale")
  raw = torch.load(path, weights_only=True)
  assert "Scale.layer5.conv2d_list.0.weight" in raw and "Scale.conv1.weight" in raw
  variables = conv.convert_checkpoint(path, "resnet101", **TINY)
  assert set(variables["params"]) == {"backbone"}
  assert set(variables["batch_stats"]) == {"backbone"}
  full = conv.convert_checkpoint(
      tref.save_layout(tiny_resnet, str(tmp_path / "bare.pth"), "bare"), "resnet101", **TINY)
  tree_equal(variables["params"]["backbone"], full["params"]["backbone"])
  tree_equal(variables["batch_stats"], full["batch_stats"])
  # With any head the backbone features are the torch ones.
  _, feats = tiny_apply({"params": {**variables["params"],
                                    "classifier": full["params"]["classifier"]},
                         "batch_stats": variables["batch_stats"]}, jnp.asarray(images))
  assert relerr(feats, torch_eval(tiny_resnet, images)[1]) < 1e-4


def test_num_classes_check_and_drop_classifier(tiny_resnet, tmp_path):
  path = tref.save_layout(tiny_resnet, str(tmp_path / "ref.pth"), "reference")
  with pytest.raises(conv.CheckpointConversionError, match="6 classes.*--num_classes=19"):
    conv.convert_checkpoint(path, "resnet101", num_classes=19, **TINY)
  v = conv.convert_checkpoint(path, "resnet101", num_classes=19, drop_classifier=True, **TINY)
  assert set(v["params"]) == {"backbone"}
  v4 = conv.convert_checkpoint(path, "resnet101", aspp_branches=4, **TINY)
  assert set(v4["params"]["classifier"]) == {"conv0", "conv1", "conv2", "conv3"}


def test_bad_state_dict_names_every_key(tiny_resnet, tmp_path):
  sd = {f"module.{k}": v.clone() for k, v in tiny_resnet.state_dict().items()}
  del sd["module.layer3.0.conv2.weight"]                     # truncated
  del sd["module.layer4.0.downsample.1.running_var"]
  sd["module.layer1.0.bn2.weight"] = torch.zeros(5)          # wrong shape
  sd["module.layer2.1.conv1.weight"] = torch.zeros(8, 32, 3, 3)
  sd["module.extra.weight"] = torch.zeros(3)                 # unexpected
  path = str(tmp_path / "bad.pth")
  torch.save({"state_dict": sd}, path)
  with pytest.raises(conv.CheckpointConversionError) as e:
    conv.convert_checkpoint(path, "resnet101", **TINY)
  msg = str(e.value)
  for name in ("missing key layer3.0.conv2.weight", "missing key layer4.0.downsample.1.running_var",
               "shape mismatch layer1.0.bn2.weight", "shape mismatch layer2.1.conv1.weight",
               "unexpected key extra.weight", path):
    assert name in msg, msg
  assert isinstance(e.value, ValueError)
  # A full-depth model reading this tiny file: every layer beyond the file is reported missing.
  with pytest.raises(conv.CheckpointConversionError, match="missing key layer3.22.conv3.weight"):
    conv.convert_checkpoint(tref.save_layout(tiny_resnet, str(tmp_path / "t.pth"), "bare"))


def test_missing_and_unreadable_files(tmp_path):
  with pytest.raises(conv.CheckpointConversionError, match="nope.pth"):
    conv.convert_checkpoint(str(tmp_path / "nope.pth"))
  bad = tmp_path / "broken.pth"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(conv.CheckpointConversionError, match="broken.pth"):
    conv.convert_checkpoint(str(bad))
  with pytest.raises(ValueError, match="backbone"):
    conv.convert_state_dict({}, "resnet50")


@pytest.fixture(scope="module")
def tiny_vgg():
  return tref.randomize_(tref.TorchDeepLabVGG(5, vgg_width=4), seed=12)


def test_vgg_reference_and_torchvision_layouts(tiny_vgg, tmp_path):
  ref_path = tref.save_layout(tiny_vgg, str(tmp_path / "vref.pth"), "reference")
  raw = torch.load(ref_path, weights_only=False)["state_dict"]
  assert "module.features.29.weight" in raw and "module.features.31.weight" in raw  # fc6, fc7
  ref = conv.convert_checkpoint(ref_path, "vgg16", vgg_width=4)
  assert set(ref) == {"params"} and set(ref["params"]) == {"backbone", "classifier"}
  x = np.random.RandomState(1).randn(1, 37, 45, 3).astype(np.float32) * 40
  logits, feats = DeepLabV2(5, backbone="vgg16", vgg_width=4).apply(ref, jnp.asarray(x))
  ref_logits, ref_feats = torch_eval(tiny_vgg, x)
  assert relerr(logits, ref_logits) < 1e-4 and relerr(feats, ref_feats) < 1e-4

  tv_path = tref.save_layout(tiny_vgg, str(tmp_path / "tv.pth"), "torchvision")
  assert "features.28.weight" in torch.load(tv_path, weights_only=True)
  tv, info = conv.convert_checkpoint_with_info(tv_path, "vgg16", vgg_width=4, seed=3)
  assert info["layout"] == "torchvision vgg16" and not info["classifier"]
  assert set(info["fresh"]) == {f"fc{i}.{p}" for i in (6, 7) for p in ("weight", "bias")}
  assert "classifier.0.weight" in info["dropped"]
  assert set(tv["params"]) == {"backbone"}
  tree_equal({k: v for k, v in tv["params"]["backbone"].items() if not k.startswith("fc")},
             {k: v for k, v in ref["params"]["backbone"].items() if not k.startswith("fc")})
  assert tv["params"]["backbone"]["fc6"]["kernel"].shape == (3, 3, 32, 64)

  sd = torch.load(tv_path, weights_only=True)
  del sd["features.28.bias"]
  sd["features.0.weight"] = torch.zeros(4, 3, 5, 5)
  torch.save(sd, str(tmp_path / "tv_bad.pth"))
  with pytest.raises(conv.CheckpointConversionError) as e:
    conv.convert_checkpoint(str(tmp_path / "tv_bad.pth"), "vgg16", vgg_width=4)
  assert "missing key features.28.bias" in str(e.value)
  assert "shape mismatch features.0.weight" in str(e.value)


def test_cli_writes_loadable_variables(tiny_resnet, tmp_path, capsys):
  path = tref.save_layout(tiny_resnet, str(tmp_path / "ref.pth"), "reference")
  out = str(tmp_path / "converted")
  assert conv.main([f"--input={path}", f"--output={out}", "--num_classes=6",
                    "--stage_blocks=1,2,1,1", f"--base_width={WIDTH}"]) == 0
  printed = capsys.readouterr().out
  n = len([k for k in tiny_resnet.state_dict() if not k.endswith("num_batches_tracked")
           and not k.startswith("layer5.") and not k.startswith("layer6.conv2d_list.2")
           and not k.startswith("layer6.conv2d_list.3")])
  assert f"converted {n} tensors" in printed
  assert "classifier found: 6 classes" in printed
  loaded = load_variables(out)
  tree_equal(loaded, conv.convert_checkpoint(path, "resnet101", **TINY))
