"""udajax.embeddings: the metrics on features of known geometry, the statistics merged over
batches and devices, the class-balanced sample, the PCA, and the command end to end."""

import functools
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_cli
from udajax import embedding_metrics
from udajax import embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def star(num_classes=3, dim=6, length=2.0, radius=0.5, per_side=4):
  """Features (1, 1, P, F) and classes (1, 1, P): class j at L e_j ± r e_{C+j}, so its centroid
  is exactly L e_j (orthogonal centroids) and every feature is exactly r from it."""
  feats, classes = [], []
  for j in range(num_classes):
    for sign in (1.0, -1.0):
      for _ in range(per_side):
        x = np.zeros(dim, np.float32)
        x[j] = length
        x[num_classes + j] = sign * radius
        feats.append(x)
        classes.append(j)
  return np.array(feats)[None, None], np.array(classes, np.int32)[None, None]


def stats_of(feats, classes, num_classes):
  return embedding_metrics.class_statistics(jnp.asarray(feats), jnp.asarray(classes), num_classes)


def test_orthogonal_centroids_identical_domains_known_spread():
  feats, classes = star()
  s = stats_of(feats, classes, 4)  # class 3 absent
  np.testing.assert_allclose(s["count"], [8, 8, 8, 0])
  np.testing.assert_allclose(s["mean"][:3], 2.0 * np.eye(3, 6), atol=1e-7)
  np.testing.assert_allclose(s["m2"][:3], 8 * 0.25, rtol=1e-6)
  m = embedding_metrics.embedding_metrics(s, s, rho=0.5)
  cos = np.asarray(m["cosine/source"])
  np.testing.assert_allclose(cos[:3, :3], np.eye(3), atol=1e-7)
  assert np.all(np.isnan(cos[3])) and np.all(np.isnan(cos[:, 3]))
  assert abs(float(m["orthogonality/source"])) < 1e-7
  assert abs(float(m["orthogonality/target"])) < 1e-7
  np.testing.assert_allclose(float(m["alignment"]), 1.0, rtol=1e-6)
  # RMS distance to the centroid 0.5 over a centroid distance 2 sqrt(2).
  expected = 0.5 / (2.0 * np.sqrt(2.0))
  np.testing.assert_allclose(np.asarray(m["clustering/source"])[:3], expected, rtol=1e-6)
  assert np.isnan(np.asarray(m["clustering/source"])[3])
  np.testing.assert_allclose(float(m["clustering/source/mean"]), expected, rtol=1e-6)
  np.testing.assert_allclose(float(m["clustering/joint/mean"]), expected, rtol=1e-6)
  # One channel of six above rho in every centroid.
  np.testing.assert_allclose(np.asarray(m["active_channels/source"])[:3], 1 / 6, rtol=1e-6)
  np.testing.assert_allclose(float(m["active_channels/target/mean"]), 1 / 6, rtol=1e-6)


def test_known_angles_alignment_and_sparsity():
  # Source centroids e0, e1; target centroids rotated by 60 degrees in their own plane.
  a = np.deg2rad(60.0)
  src = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
  tgt = np.array([[np.cos(a), 0, np.sin(a), 0], [0, np.cos(a), 0, np.sin(a)]], np.float32)
  cls = np.array([[[0, 1]]], np.int32)
  s = stats_of(src[None, None], cls, 2)
  t = stats_of(tgt[None, None], cls, 2)
  m = embedding_metrics.embedding_metrics(s, t, rho=0.5)
  np.testing.assert_allclose(float(m["alignment"]), 0.5, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(m["cosine/source_target"]), [[0.5, 0], [0, 0.5]],
                             atol=1e-7)
  # Centroid (0.5, 0, 0.866, 0) / 0.866: channels 0.577 and 1 exceed rho = 0.5: 2 of 4.
  np.testing.assert_allclose(float(m["active_channels/target/mean"]), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(m["active_channels/source/mean"]), 0.25, rtol=1e-6)
  # Centroids 60 degrees apart: |cos| = 0.5 off the diagonal.
  c = stats_of(np.array([[1, 0], [np.cos(a), np.sin(a)]], np.float32)[None, None], cls, 2)
  m = embedding_metrics.embedding_metrics(c, c, rho=0.5)
  np.testing.assert_allclose(float(m["orthogonality/source"]), 0.5, rtol=1e-6)
  # One feature per class: zero spread, clustering 0.
  np.testing.assert_allclose(np.asarray(m["clustering/source"]), [0, 0], atol=1e-7)


def test_statistics_merge_over_batches_and_devices():
  rng = np.random.default_rng(0)
  feats = (rng.normal(size=(4, 3, 5, 7)) + 10.0).astype(np.float32)  # far from 0: cancellation
  classes = rng.integers(-1, 4, size=(4, 3, 5)).astype(np.int32)  # -1: no class
  whole = stats_of(feats, classes, 4)
  merged = None
  for b in range(4):
    one = stats_of(feats[b:b + 1], classes[b:b + 1], 4)
    merged = one if merged is None else embedding_metrics.merge_statistics(merged, one)
  # float64 reference
  x = feats.reshape(-1, 7).astype(np.float64)
  c = classes.reshape(-1)
  for j in range(4):
    xj = x[c == j]
    np.testing.assert_allclose(whole["count"][j], len(xj))
    np.testing.assert_allclose(whole["mean"][j], xj.mean(0), rtol=1e-6)
    m2 = np.sum((xj - xj.mean(0)) ** 2)
    np.testing.assert_allclose(whole["m2"][j], m2, rtol=1e-4)
    np.testing.assert_allclose(merged["m2"][j], m2, rtol=1e-4)
    np.testing.assert_allclose(merged["mean"][j], xj.mean(0), rtol=1e-6)
  # pmap over the 4 test devices, one image each, gives the single-device statistics.
  f = jax.pmap(functools.partial(embedding_metrics.class_statistics, num_classes=4, axis_name="i"),
               axis_name="i")
  dev = jax.tree_util.tree_map(lambda v: np.asarray(v[0]), f(feats[:, None], classes[:, None]))
  for k in ("count", "mean", "m2"):
    np.testing.assert_allclose(dev[k], whole[k], rtol=1e-5)


def test_class_balanced_sample_and_pca():
  rng = np.random.default_rng(1)
  classes = np.repeat(np.array([0, 1, 2, 255]), [50, 5, 30, 15]).astype(np.int32)
  rng.shuffle(classes)
  feats = np.zeros((100, 3), np.float32)
  feats[:, 0] = np.arange(100)
  feats[:, 1] = classes
  pool = None
  for b in range(4):  # four batches of 25 positions
    part = slice(25 * b, 25 * (b + 1))
    s = embedding_metrics.class_sample(jnp.asarray(feats[part])[None, None],
                                jnp.asarray(classes[part])[None, None], 4, 8,
                                jax.random.PRNGKey(b))
    pool = embedding_metrics.merge_samples(pool, jax.device_get(s), 8)
  x, c = embedding_metrics.sample_points(pool)
  assert np.bincount(c, minlength=4).tolist() == [8, 5, 8, 0]
  np.testing.assert_array_equal(x[:, 1], c)  # every sampled feature is of its class
  assert len(set(x[:, 0].tolist())) == len(x)  # without replacement
  # PCA: points on a line along (1, 2, 0) project onto the first axis, explained variance 1.
  line = np.outer(np.arange(-3.0, 4.0), [1.0, 2.0, 0.0])
  points, ev = embedding_metrics.project_2d(line)
  np.testing.assert_allclose(np.abs(points[:, 0]), np.abs(np.arange(-3.0, 4.0)) * np.sqrt(5),
                             rtol=1e-9)
  np.testing.assert_allclose(points[:, 1], 0, atol=1e-9)
  np.testing.assert_allclose(ev, [1.0, 0.0], atol=1e-12)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory):
  return train_cli.demo_data_dir(tmp_path_factory)


def tiny_config(data_dir):
  """`train_cli.config` (whose train step the subprocess tests compile too) trained for its 10
  steps, with one eval at the end on 8 images that logs the embedding diagnostics."""
  return train_cli.config(data_dir, **{
      "train.log_every_steps": 10, "train.checkpoint_every_steps": 10, "eval.every_steps": 10,
      "eval.split": "validation[:8]", "eval.batch_size_per_device": 2,
      "eval.embedding_images": 6, "eval.embedding_points_per_class": 20})


# configs/demo.py with these values: the command line's flags and the library call's config.
TINY_OVERRIDES = {"model.base_width": 4, "eval.split": "validation[:8]",
                  "eval.batch_size_per_device": 2}
TINY_FLAGS = ["--config=configs/demo.py"] + [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]


def _run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "udajax.embeddings", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, check=False,
                        env=train_cli.env())


@pytest.fixture(scope="module")
def trained(demo_data_dir, tmp_path_factory):
  """A 10-step tiny run: its workdir and its TensorBoard tags."""
  from tests.test_trainer import event_tags
  from udajax import trainer
  workdir = str(tmp_path_factory.mktemp("embeddings_run"))
  trainer.train_and_evaluate(tiny_config(demo_data_dir), workdir)
  return workdir, event_tags(workdir)


def test_trainer_logs_embeddings(trained):
  _, tags = trained
  for k in embedding_metrics.SCALAR_KEYS:
    assert f"embeddings/{k}" in tags, k
  assert "embeddings/cosine_and_projection" in tags


def test_cli_workdir_and_converted_checkpoint(trained, demo_data_dir, tmp_path):
  from udajax import checkpoints
  workdir, _ = trained
  out = tmp_path / "out"
  proc = _run_cli(*TINY_FLAGS, f"--config.data_dir={demo_data_dir}", f"--checkpoint={workdir}",
                  "--which=latest", f"--output={out}", "--num_images=5", "--points_per_class=7")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "alignment" in proc.stdout
  assert sorted(os.listdir(out)) == ["cosine.png", "embeddings.json", "embeddings.png",
                                     "projection.png"]
  record = json.loads((out / "embeddings.json").read_text())
  assert record["step"] == 10 and record["num_images"] == {"source": 5, "target": 5}
  assert record["assignment"] == {"source": "labels", "target": "labels"}
  assert set(record["scalars"]) == set(embedding_metrics.SCALAR_KEYS)
  for k in ("orthogonality/source", "orthogonality/target", "alignment"):
    assert 0.0 <= record["scalars"][k] <= 1.0 + 1e-6, (k, record["scalars"][k])
  assert 0.0 <= record["scalars"]["active_channels/target/mean"] <= 1.0
  assert len(record["cosine"]["source_target"]) == 19
  counts = [v or 0 for v in record["per_class"]["count/source"].values()]
  # 5 images of 96x192: 13 x 25 feature positions each (stride 8, the stem's ceil-mode pool),
  # every one labelled in the demo data.
  assert sum(counts) == 5 * 13 * 25
  assert 0 < record["projection"]["points"] <= 2 * 7 * 19
  # The same model as a converted checkpoint (no step) gives the same numbers: the library call
  # behind the command line, in this process (the command line itself is tested above).
  variables = checkpoints.load_workdir_variables(workdir)
  converted = checkpoints.save_variables(str(tmp_path / "converted"), variables)
  out2 = tmp_path / "out2"
  config = importlib.import_module("configs.demo").get_config()
  config.update_from_flattened_dict({**TINY_OVERRIDES, "data_dir": demo_data_dir})
  embeddings.measure_checkpoint(config, converted, str(out2), num_images=5, points_per_class=7)
  second = json.loads((out2 / "embeddings.json").read_text())
  assert second["step"] is None
  for k, v in record["scalars"].items():
    np.testing.assert_allclose(second["scalars"][k], v, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("case", ["missing checkpoint", "bad which", "dataset not built",
                                  "bad num_images"])
def test_bad_inputs_one_line(case, demo_data_dir, tmp_path):
  args = [*TINY_FLAGS, f"--config.data_dir={demo_data_dir}", f"--output={tmp_path / 'out'}",
          f"--checkpoint={tmp_path / 'no_such_run'}"]
  if case == "bad which":
    args.append("--which=last")
    expect = "--which=last: value should be one of <best|latest>"
  elif case == "dataset not built":
    # The target (eval) set is the demo's; the source names GTA5, not built there. The
    # checkpoint must exist (an empty folder): a missing one is reported first.
    args += ["--config.source.name=gta5", "--config.source.builder_config=1280x720",
             f"--checkpoint={tmp_path}"]
    expect = "python data_prep/build_datasets.py gta5"
  elif case == "bad num_images":
    args.append("--num_images=0")
    expect = "--num_images=0: must be a positive number of images per domain"
  else:
    expect = "no_such_run does not exist"
  proc = _run_cli(*args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  (line,) = [s for s in proc.stderr.splitlines() if s.startswith("error: ")]
  assert expect in line, line


def test_pca_matches_the_exact_svd():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 64)) / np.arange(1, 65) ** 0.7 + 5.0
  points, ev = embedding_metrics.project_2d(x)
  xc = x - x.mean(0)
  _, s, vt = np.linalg.svd(xc, full_matrices=False)
  np.testing.assert_allclose(ev, s[:2] ** 2 / np.sum(s ** 2), rtol=1e-9)
  np.testing.assert_allclose(np.abs(points), np.abs(xc @ vt[:2].T), atol=1e-6)


@pytest.mark.parametrize("key,value,why", [
    ("embedding_images", -1, "must be an int >= 0 (images per domain; 0 = off)"),
    ("embedding_points_per_class", 0, "must be an int >= 1")])
def test_config_keys_validated(key, value, why):
  from udajax import configuration
  c = importlib.import_module("configs.demo").get_config()
  c.eval[key] = value
  with pytest.raises(configuration.ConfigError, match=f"config key 'eval.{key}' = {value}: "
                     + why.replace("(", r"\(").replace(")", r"\)")):
    configuration.validate_config(c)
  c.eval[key] = 0 if key == "embedding_images" else 1
  configuration.validate_config(c)
