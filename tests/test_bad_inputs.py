"""User mistakes give one clear error line (what, where, how to fix), never a traceback.

Library-level checks call the function the trainer calls and check the message; the command-line
checks run `python train.py` / `python data_prep/build_datasets.py` and check the exit status and
that stderr holds an `error: ...` line and no traceback. Listed in README.md "Troubleshooting".
"""

import gc
import os
import sys

import jax
import numpy as np
import pytest

from tests import fake_data
from tests import train_cli
from udajax import checkpoints
from udajax import configuration
from udajax import data
from udajax import datasets
from udajax import errors
from udajax import train_step as ts


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
  return train_cli.demo_data_dir(tmp_path_factory)


def _one_error_line(stderr):
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def _tiny_variables(c):
  """Variables of the model of config `c`, all ones (shapes only: nothing is compiled)."""
  model = ts.create_model(c, axis_name=None)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3)),
                                             train=False))
  return jax.tree_util.tree_map(lambda x: np.ones(x.shape, x.dtype), shapes)


def _save_tiny_variables(path, **model):
  """A converted-checkpoint-style directory of a tiny model with `model` overrides."""
  c = train_cli.config(None)
  for k, v in model.items():
    if k == "num_classes":
      c.num_classes = v
    else:
      c.model[k] = v
  variables = _tiny_variables(c)
  return checkpoints.save_variables(str(path), {"params": variables["params"],
                                             "batch_stats": variables.get("batch_stats", {})})


# ------------------------------------------------------------------------------ command line


def test_unknown_config_key_on_the_command_line(tmp_path):
  r = train_cli.run([sys.executable, "train.py", "--config=configs/demo.py",
                     f"--workdir={tmp_path}", "--config.train.lrr=1e-3"], timeout=120)
  assert r.returncode == 2
  line = _one_error_line(r.stderr)
  assert "'train.lrr' is unknown" in line and "did you mean 'train.lr'" in line, line


def test_corrupt_png_in_manual_dir(tmp_path):
  fake_data.write_gta5(tmp_path / "gta5", n=3)
  bad = tmp_path / "gta5" / "images" / "00002.png"
  fake_data.corrupt_png(bad)
  r = train_cli.run([sys.executable, "data_prep/build_datasets.py", "gta5", "--config=full",
                     f"--manual_dir={tmp_path / 'gta5'}", f"--data_dir={tmp_path / 'data'}"],
                    timeout=120)
  assert r.returncode == 2
  line = _one_error_line(r.stderr)
  assert str(bad) in line and "cannot decode" in line, line
  assert "--skip_corrupt" in r.stderr


def test_manual_dir_without_images(tmp_path, capsys):
  """A manual dir with the right folders but no frames: one line naming the dir and what to get."""
  from data_prep import build_datasets
  (tmp_path / "gta5" / "images").mkdir(parents=True)
  (tmp_path / "gta5" / "labels").mkdir()
  with pytest.raises(SystemExit) as e:
    build_datasets.main(["gta5", f"--manual_dir={tmp_path / 'gta5'}",
                         f"--data_dir={tmp_path / 'data'}"])
  assert e.value.code == 2
  msg = _one_error_line(capsys.readouterr().err)
  assert msg.startswith("error: no gta5 train images found under"), msg
  assert str(tmp_path / "gta5") in msg and "images/NNNNN.png" in msg


# ------------------------------------------------------------------------------ library


def test_missing_dataset_names_the_build_command(demo_data_dir, tmp_path):
  c = train_cli.config(str(tmp_path / "empty"), **{"source.name": "gta5",
                                                   "source.builder_config": "1280x720"})
  with pytest.raises(datasets.DatasetNotBuiltError) as info:
    data.check_train_sizes(c)
  msg = str(info.value)
  assert "gta5/1280x720 is not built" in msg and "python data_prep/build_datasets.py gta5" in msg


def test_training_run_checks_its_eval_set_before_the_first_step(demo_data_dir, tmp_path):
  """An eval set whose folder exists but holds no built version (an interrupted or older build)
  stops a training run in `prepare_datasets`, not at its first evaluation."""
  os.symlink(os.path.join(demo_data_dir, "udajax_demo"), tmp_path / "udajax_demo")
  (tmp_path / "cityscapes" / "1024x512").mkdir(parents=True)
  c = train_cli.config(str(tmp_path), **{"eval.name": "cityscapes",
                                         "eval.builder_config": "1024x512"})
  with pytest.raises(datasets.DatasetNotBuiltError, match=r"looked for .*1024x512.1\.0\.0"):
    data.prepare_datasets(c, training=True)


def test_training_crop_larger_than_stored_images(demo_data_dir):
  c = train_cli.config(demo_data_dir, **{"source.image_size": (192, 384)})
  with pytest.raises(configuration.ConfigError) as info:
    data.check_train_sizes(c)
  msg = str(info.value)
  assert "'source.image_size' = (192, 384)" in msg and "(96x192, HxW)" in msg, msg
  data.check_train_sizes(train_cli.config(demo_data_dir, **{"source.image_size": (64, 128)}))


def test_unknown_key_and_negative_lambda_in_a_config():
  c = train_cli.config(None)
  c.loss.lambda_or = -1.0
  with pytest.raises(configuration.ConfigError,
                     match=r"'loss.lambda_or' = -1.0: loss weights must be >= 0"):
    configuration.validate_config(c)
  c = train_cli.config(None)
  with pytest.raises(AttributeError, match=r'"lrr" does not exist'):
    c.train.lrr = 1.0  # a typo in a config file: configs start from the locked base_config()


def test_missing_init_checkpoint(tmp_path):
  c = train_cli.config(None, init_checkpoint=str(tmp_path / "nope"))
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.initial_variables(c, jax.random.PRNGKey(0))
  assert "does not exist" in str(info.value)
  assert "convert_torch_checkpoint.py" in str(info.value)


def test_remote_init_checkpoint():
  c = train_cli.config(None, init_checkpoint="gs://bucket/runs/gta_source")
  with pytest.raises(checkpoints.CheckpointError,
                     match="init checkpoint gs://bucket/runs/gta_source: remote .URL. paths"):
    checkpoints.initial_variables(c, jax.random.PRNGKey(0))


def test_corrupt_init_checkpoint(tmp_path):
  path = _save_tiny_variables(tmp_path / "ckpt")
  for root, _, files in os.walk(path):
    for f in files:  # overwrite every data and metadata file with garbage
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")
  c = train_cli.config(None, init_checkpoint=path)
  with pytest.raises(checkpoints.CheckpointError, match="cannot read checkpoint"):
    checkpoints.initial_variables(c, jax.random.PRNGKey(0))


@pytest.mark.parametrize("model,needle", [
    ({"num_classes": 16}, "shape of params/classifier"),
    ({"backbone": "vgg16"}, "unexpected params/"),
])
def test_init_checkpoint_for_another_model(tmp_path, model, needle):
  path = _save_tiny_variables(tmp_path / "ckpt", **model)
  c = train_cli.config(None, init_checkpoint=path)
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.initial_variables(c, jax.random.PRNGKey(0))
  msg = str(info.value)
  assert "does not fit the configured model (check config.num_classes" in msg and needle in msg, msg
  assert "\n" not in msg


def test_workdir_without_complete_checkpoint_as_init(tmp_path):
  os.makedirs(tmp_path / "run" / "checkpoints" / "5")  # unfinished: no commit marker
  with pytest.raises(checkpoints.CheckpointError, match="no complete checkpoint"):
    checkpoints.load_init_tree(str(tmp_path / "run"))


# A restore that orbax starts and fails part-way leaves its other array reads abandoned, each
# reported as an "Exception ignored" traceback: the layout is checked before restoring.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_resume_with_a_changed_config(tmp_path):
  """A work directory restarted with another model config fails with a clear message that
  names the arrays that do not fit, read from a fresh manager (as a restarted job does)."""
  c16 = train_cli.config(None, num_classes=16)
  rng = jax.random.PRNGKey(0)
  state16 = ts.create_train_state(c16, _tiny_variables(c16), rng)
  manager = checkpoints.checkpoint_manager(str(tmp_path))
  checkpoints.save_state(manager, 1, jax.device_get(state16))
  manager.wait_until_finished()
  c19 = train_cli.config(None)
  state19 = ts.create_train_state(c19, _tiny_variables(c19), rng)
  with pytest.raises(checkpoints.CheckpointError,
                     match="cannot resume from checkpoint step 1 .*use a new --workdir") as e:
    checkpoints.restore_state(checkpoints.checkpoint_manager(str(tmp_path)), 1, state19)
  assert "10 arrays of another shape" in str(e.value), str(e.value)
  assert "centroid_state/centroids saved (16, 128) vs (19, 128)" in str(e.value), str(e.value)
  gc.collect()  # abandoned orbax reads would be reported here, failing the test (filter above)


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("x")
  r = train_cli.run([sys.executable, "train.py", "--config=configs/demo.py",
                     f"--workdir={path}"], timeout=120)
  assert r.returncode == 2
  line = _one_error_line(r.stderr)
  assert f"--workdir={path} is a file" in line, line


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", b""])
def test_convert_a_file_that_is_not_a_checkpoint(tmp_path, content):
  path = tmp_path / "notes.pth"
  path.write_bytes(content)
  r = train_cli.run([sys.executable, "data_prep/convert_torch_checkpoint.py", f"--input={path}",
                     f"--output={tmp_path / 'out'}"], timeout=120)
  assert r.returncode == 2, r.stderr
  line = _one_error_line(r.stderr)
  assert f"cannot read PyTorch checkpoint {path}" in line, line
  assert not (tmp_path / "out").exists()


def test_convert_a_missing_file(tmp_path):
  r = train_cli.run([sys.executable, "data_prep/convert_torch_checkpoint.py",
                     f"--input={tmp_path / 'nope.pth'}", f"--output={tmp_path / 'out'}"],
                    timeout=120)
  assert r.returncode == 2
  assert "nope.pth does not exist" in _one_error_line(r.stderr)


def test_typo_in_a_config_file(tmp_path):
  """Config files start from the locked base config: a misspelt key fails at load, named."""
  path = tmp_path / "typo.py"
  path.write_text("from configs import demo\n\n\ndef get_config():\n  c = demo.get_config()\n"
                  "  c.train.lrr = 1e-3\n  return c\n")
  r = train_cli.run([sys.executable, "train.py", f"--config={path}", f"--workdir={tmp_path / 'w'}"],
                    timeout=120)
  assert r.returncode == 2
  line = _one_error_line(r.stderr)
  assert f"cannot load config file {path}" in line and '"lrr" does not exist' in line, line
  assert 'Did you mean "lr"' in line, line


@pytest.mark.parametrize("program,missing,jax_too", [
    ("udajax.predict", "checkpoint", True), ("udajax.evaluate", "checkpoint", True),
    ("udajax.embeddings", "checkpoint", False), ("udajax.predict", "dataset", True),
    ("udajax.evaluate", "dataset", True), ("udajax.embeddings", "dataset", False),
    ("train.py", "dataset", True), ("train.py", "target dataset", True)])
def test_missing_checkpoint_or_dataset_fails_before_tensorflow_is_imported(
    tmp_path, program, missing, jax_too):
  """predict / evaluate / embeddings with a --checkpoint that does not exist, or (with an existing
  checkpoint folder) a config whose eval set is not built, and train.py with a dataset that is
  not built (the eval set; or, on the demo, a target set): the one error line comes before
  TensorFlow is imported, and except for embeddings (which imports jax with the module) before
  jax."""
  argv = [program, f"--checkpoint={tmp_path / 'no_such_run'}", "--config=configs/demo.py"]
  expect = "no_such_run does not exist"
  if missing != "checkpoint":  # configs/gta.py evaluates on Cityscapes 1024x512
    argv[1:] = [f"--checkpoint={tmp_path}", "--config=configs/gta.py",
                f"--config.data_dir={tmp_path / 'no_data'}"]
    expect = (f"dataset cityscapes/1024x512 is not built under {tmp_path / 'no_data'} "
              "(looked for ")
  if missing == "target dataset":  # the demo's source and eval sets, then a missing target set
    argv[2:] = ["--config=configs/demo.py", f"--config.data_dir={tmp_path / 'no_data'}",
                "--config.target.name=cityscapes", "--config.target.builder_config=1024x512"]
  if program == "train.py":
    argv[1] = f"--workdir={tmp_path / 'run'}"
  elif program != "udajax.evaluate":
    argv.append(f"--output={tmp_path / 'out'}")
  run = (f"runpy.run_path({program!r}, run_name='__main__')" if program.endswith(".py") else
         f"runpy.run_module({program!r}, run_name='__main__', alter_sys=True)")
  code = ("import runpy, sys\n"
          f"sys.argv = {argv!r}\n"
          "try:\n"
          f"  {run}\n"
          "except SystemExit as e:\n"
          "  print('exit', e.code, *[m for m in ('jax', 'tensorflow') if m in sys.modules])\n")
  r = train_cli.run([sys.executable, "-c", code], timeout=120)
  assert r.stdout.startswith("exit 2"), (r.stdout, r.stderr[-2000:])
  loaded = r.stdout.split()[2:]
  assert "tensorflow" not in loaded and not (jax_too and "jax" in loaded), loaded
  line = _one_error_line(r.stderr)
  assert expect in line, line
  if missing != "checkpoint":
    assert "python data_prep/build_datasets.py cityscapes" in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_checkpoint_paths_a_file_empty_or_remote():
  """The checkpoint check names the problem: a file (with the converter command for it), an
  empty path, a URL (udajax's paths are local: gs://b/run would become a folder named "gs:")."""
  with pytest.raises(errors.CheckpointError, match="is a file, not a directory.*--input=/"):
    errors.require_checkpoint_dir(__file__)
  with pytest.raises(errors.CheckpointError, match="no checkpoint given"):
    errors.require_checkpoint_dir("")
  with pytest.raises(errors.CheckpointError, match="remote .URL. paths are not supported"):
    errors.require_checkpoint_dir("gs://bucket/run")
  assert errors.require_checkpoint_dir(os.path.dirname(__file__)) == os.path.dirname(__file__)


def test_remote_workdir_is_one_error_line_and_creates_nothing(tmp_path):
  """--workdir=gs://... fails before anything is written: no local "gs:" folder appears."""
  from udajax import trainer
  r = train_cli.run([sys.executable, os.path.join(train_cli.ROOT, "train.py"),
                     "--config=" + os.path.join(train_cli.ROOT, "configs", "demo.py"),
                     "--workdir=gs://bucket/runs/demo"], timeout=120, cwd=tmp_path)
  assert r.returncode == 2
  assert "--workdir gs://bucket/runs/demo: remote (URL) paths are not supported" in (
      _one_error_line(r.stderr))
  assert os.listdir(tmp_path) == []
  with pytest.raises(errors.UserError, match="work directory gs://b/run: remote"):
    trainer.train_and_evaluate(train_cli.config(None), "gs://b/run")
