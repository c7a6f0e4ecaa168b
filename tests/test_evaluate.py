"""`python -m udajax.evaluate`: evaluates converted checkpoints; rejects a head-less one."""

import importlib

import jax
import numpy as np
import pytest

from udajax import checkpoints
from udajax import datasets
from udajax import evaluation
from udajax import train_step as ts


def test_evaluate_converted_checkpoint_and_reject_headless(tmp_path, capsys):
  data_dir = str(tmp_path / "tfds")
  datasets.ensure_demo_built(data_dir)
  config = importlib.import_module("configs.demo").get_config()
  config.data_dir = data_dir
  config.model.base_width = 4
  config.eval.batch_size_per_device = 16
  variables = jax.device_get(ts.init_variables(config, jax.random.PRNGKey(0)))
  path = checkpoints.save_variables(str(tmp_path / "converted"), variables)

  summary = evaluation.evaluate_checkpoint(config, path)
  out = capsys.readouterr().out
  assert "mIoU" in out and "road" in out
  assert 0.0 <= summary["mIoU"] <= 100.0 and 0.0 <= summary["pixel_accuracy"] <= 100.0
  # Flip TTA runs through the same path and gives a valid summary too.
  config.eval.flip = True
  flipped = evaluation.evaluate_checkpoint(config, path)
  assert np.isfinite(flipped["mIoU"])

  # Labels at another resolution than the image (the full-resolution protocol): the logits are
  # upsampled to the label size before the argmax.
  config.eval.flip = False
  config.eval.label_size = (192, 384)
  big = evaluation.evaluate_checkpoint(config, path)
  assert np.isfinite(big["mIoU"]) and 0.0 <= big["pixel_accuracy"] <= 100.0

  headless = {"params": {"backbone": variables["params"]["backbone"]},
              "batch_stats": variables["batch_stats"]}
  path2 = checkpoints.save_variables(str(tmp_path / "imagenet"), headless)
  with pytest.raises(checkpoints.CheckpointError, match="no classifier"):
    evaluation.evaluate_checkpoint(config, path2)
