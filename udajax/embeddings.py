r"""The geometry of the feature space: class centroids, their cosine similarities, clustering,
sparse channels, and a 2-D projection of a class-balanced sample of features.

    python -m udajax.embeddings --config=configs/demo.py --checkpoint=runs/demo \
        [--which=best|latest] --output=DIR [--num_images=N] [--points_per_class=K]

What is measured (docs/EMBEDDINGS.md). N images of each domain are run through the eval-mode
network in the evaluation's batches: the first N of the source split (`config.source.*`) and of
the eval set (`config.eval.*`, the target). Each encoder feature (stride 8) gets a class: its
ground-truth label, nearest-downsampled to the feature grid, when the domain's split has labels;
else the network's prediction (argmax of the logits at the same position). Which one was used
is recorded per domain ("assignment"). On device, per domain and class: the feature count, the
centroid (mean feature) and the sum of squared distances to it, merged over batches and devices
exactly; then

* `cosine/<domain>`: (C, C) cosine similarities of the domain's centroids, and
  `cosine/source_target`: source centroid i against target centroid j;
* `orthogonality/<domain>`: mean |cos| over the off-diagonal pairs of present classes (0 =
  mutually orthogonal centroids);
* `alignment`: mean over classes present in both domains of cos(source c_j, target c_j)
  (1 = both domains share the centroid direction);
* `clustering/<domain>` per class j: RMS distance of the class's features to c_j divided by the
  mean distance from c_j to the other present centroids, and its mean over classes (lower =
  tighter, better separated clusters); "joint" uses the centroids of both domains pooled, as the
  clustering loss does;
* `active_channels/<domain>` per class j: fraction of channels f with c_jf / max_f' c_jf' > ρ
  (`config.loss.sparsity_rho`, the threshold of the sparsity loss), and its mean over classes
  (lower = sparser centroids).

Absent classes are NaN. The projection: up to `points_per_class` features per class and domain,
a uniform random sample without replacement (the features with the highest i.i.d. uniform keys,
picked on device per batch, merged on the host), projected with PCA (`project_2d`) on the host.

The statistics and metrics themselves are pure functions in `udajax.embedding_metrics`.
Importing this module needs jax and numpy only (no TensorFlow, no matplotlib): the data
pipeline and the plots are imported when used.
"""

import json
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from udajax import ops
from udajax.embedding_metrics import (DOMAINS, SCALAR_KEYS, class_sample, class_statistics,
                                      embedding_metrics, merge_samples, merge_statistics,
                                      project_2d, sample_points)

AXIS = "batch"


# ----------------------------------------------------------------------------- running a model


def make_p_embedding_step(config, points_per_class: int):
  """The pmapped eval-mode forward that returns per-batch statistics and sample candidates.

  f(params, batch_stats, batch, seed, assignment) with batch {"image" (D, B, H, W, 3), "label"
  (D, B, Hl, Wl), "mask" (D, B)}, seed (D,) uint32 (per batch), assignment "labels" |
  "predictions" (static) -> ({"count", "mean", "m2"} summed over devices (D, ...),
  {"key", "features"} per device (D, C, k[, F])).
  """
  from udajax import train_step as ts
  model = ts.create_model(config, axis_name=None)
  num_classes = config.num_classes

  def step(params, batch_stats, batch, seed, assignment):
    logits, feats = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                train=False)
    hw = feats.shape[1:3]
    if assignment == "labels":
      classes = ops.resize_nearest(batch["label"], hw)
    else:  # the full-size argmax at the positions nearest-downsampling picks
      classes = jnp.argmax(ops.resize_nearest(logits, hw), axis=-1)
    classes = jnp.where(batch["mask"][:, None, None], classes.astype(jnp.int32), -1)
    stats = class_statistics(feats, classes, num_classes, axis_name=AXIS)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), jax.lax.axis_index(AXIS))
    return stats, class_sample(feats, classes, num_classes, points_per_class, key)

  return jax.pmap(step, axis_name=AXIS, static_broadcasted_argnums=(4,))


_STEPS = {}


def _cached_step(config, points_per_class: int):
  """One pmapped step per (model, classes, sample size): the trainer calls this every eval."""
  key = (json.dumps(config.model.to_dict(), sort_keys=True, default=str), config.num_classes,
         points_per_class)
  if key not in _STEPS:
    _STEPS[key] = make_p_embedding_step(config, points_per_class)
  return _STEPS[key]


def domain_batches(config, domain: str):
  """The evaluation's batches (`input_pipeline.eval_iterator`) of one domain: "source" reads
  `config.source` (split and image size; labels at the image size), "target" the eval set
  `config.eval` (as `data.eval_batches`)."""
  import jax as _jax
  from udajax import data
  from udajax import input_pipeline
  if domain == "target":
    return data.eval_batches(config)
  s = config.source
  return input_pipeline.eval_iterator(
      s.name, builder_config=s.builder_config, split=s.split, data_dir=config.data_dir,
      image_size=tuple(s.image_size), label_size=None,
      batch_size_per_device=config.eval.batch_size_per_device,
      num_local_devices=_jax.local_device_count(), num_classes=config.num_classes)


def has_labels(batch, num_classes: int) -> bool:
  """Whether a batch carries any ground-truth label in [0, num_classes) on a real example."""
  label = np.asarray(batch["label"])
  mask = np.asarray(batch["mask"]).reshape(label.shape[:2] + (1,) * (label.ndim - 2))
  return bool(np.any((label >= 0) & (label < num_classes) & mask))


def collect_domain(config, p_step, params, batch_stats, domain: str, num_images: int,
                   points_per_class: int):
  """Runs the first `num_images` images of `domain` (all processes together) through `p_step`.

  The class of each feature comes from the labels when the first batch has any, else from the
  predictions. Returns (statistics summed over batches (on device), merged sample (numpy,
  this process's images only), assignment, number of images counted).
  """
  stats, sample, assignment, counted = None, None, None, 0
  num_processes, process = jax.process_count(), jax.process_index()
  local = jax.local_device_count() * config.eval.batch_size_per_device
  # Every process runs the same number of batches (the step sums over all devices).
  num_batches = -(-(-(-num_images // num_processes)) // local)
  for i, batch in enumerate(domain_batches(config, domain)):
    if i >= num_batches:
      break
    mask = np.asarray(batch["mask"])
    # The eval iterator gives process p the examples p, p + P, ...: example index of each slot.
    index = process + num_processes * (i * local + np.arange(local).reshape(mask.shape))
    mask = mask & (index < num_images)
    if assignment is None:
      assignment = "labels" if has_labels(batch, config.num_classes) else "predictions"
    counted += int(mask.sum())
    seed = np.full((mask.shape[0],), (i * 7919 + process) % (2 ** 31), np.uint32)
    batch_stats_d, batch_sample = p_step(
        params, batch_stats, {"image": batch["image"], "label": batch["label"], "mask": mask},
        seed, assignment)
    one = jax.tree_util.tree_map(lambda v: v[0], batch_stats_d)
    stats = one if stats is None else _merge_jit(stats, one)
    fetched = jax.device_get(batch_sample)
    for d in range(mask.shape[0]):
      sample = merge_samples(sample, {k: v[d] for k, v in fetched.items()}, points_per_class)
  if stats is None:
    raise ValueError(f"no {domain} images to measure (num_images={num_images})")
  return stats, sample, assignment, counted


_merge_jit = jax.jit(merge_statistics)


def measure(config, params, batch_stats, *, num_images: int,
            points_per_class: int) -> dict:
  """All of the module docstring for replicated `params` / `batch_stats` (pmap layout).

  Returns a dict: "scalars" {name: float}; "per_class" {name: (C,) numpy}; "matrices"
  {"cosine/...": (C, C) numpy}; "assignment", "num_images" {domain: ...}; "projection":
  {"points" (n, 2), "classes" (n,), "domains" (n,) 0 = source 1 = target,
  "explained_variance" (2,), "seconds" (host time of the PCA)}; "seconds": device part.
  """
  start = time.time()
  p_step = _cached_step(config, points_per_class)
  stats, samples, assignment, counted = {}, {}, {}, {}
  for d in DOMAINS:
    stats[d], samples[d], assignment[d], counted[d] = collect_domain(
        config, p_step, params, batch_stats, d, num_images, points_per_class)
  metrics = jax.device_get(embedding_metrics(stats["source"], stats["target"],
                                             rho=float(config.loss.sparsity_rho)))
  device_seconds = time.time() - start
  start = time.time()
  feats, classes, domains = [], [], []
  for i, d in enumerate(DOMAINS):
    f, c = sample_points(samples[d])
    feats.append(f)
    classes.append(c)
    domains.append(np.full(c.shape, i))
  points, explained = project_2d(np.concatenate(feats))
  return {
      "scalars": {k: float(metrics[k]) for k in SCALAR_KEYS},
      "per_class": {k: np.asarray(v) for k, v in metrics.items()
                    if not k.startswith("cosine/") and np.ndim(v) == 1},
      "matrices": {k: np.asarray(v) for k, v in metrics.items() if k.startswith("cosine/")},
      "assignment": assignment,
      "num_images": counted,
      "projection": {"points": points, "classes": np.concatenate(classes),
                     "domains": np.concatenate(domains), "explained_variance": explained,
                     "seconds": time.time() - start},
      "seconds": device_seconds,
  }


def log_embeddings(config, params, batch_stats, writer, step: int) -> Optional[dict]:
  """The trainer's hook: measures with `config.eval.embedding_images` images per domain (0 =
  off: returns None) and writes the scalars and one image ("embeddings/cosine_and_projection":
  the three cosine heatmaps and the projection) to the clu `writer`."""
  n = config.eval.embedding_images
  if n <= 0:
    return None
  from udajax import embedding_plots
  from udajax import labels as labels_lib
  result = measure(config, params, batch_stats, num_images=n,
                   points_per_class=config.eval.embedding_points_per_class)
  writer.write_scalars(step, {f"embeddings/{k}": v for k, v in result["scalars"].items()
                              if math.isfinite(v)})
  names = labels_lib.class_names(config.num_classes)
  writer.write_images(step, {"embeddings/cosine_and_projection": embedding_plots.figure_array(
      embedding_plots.overview_figure(result, names, title=f"step {step}"))})
  return result


# ----------------------------------------------------------------------------- files


def result_to_json(result: dict, class_names) -> dict:
  """The measurement as plain JSON (NaN as null): scalars, per-class values by class name,
  the cosine matrices (rows/columns in class order), assignment, images and timings."""
  def num(v):
    v = float(v)
    return None if not math.isfinite(v) else v
  return {
      "scalars": {k: num(v) for k, v in result["scalars"].items()},
      "per_class": {k: {n: num(x) for n, x in zip(class_names, v)}
                    for k, v in result["per_class"].items()},
      "cosine": {k.split("/", 1)[1]: [[num(x) for x in row] for row in m]
                 for k, m in result["matrices"].items()},
      "classes": list(class_names),
      "assignment": result["assignment"],
      "num_images": result["num_images"],
      "projection": {"method": "pca", "points": int(len(result["projection"]["points"])),
                     "explained_variance": [num(x) for x in
                                            result["projection"]["explained_variance"]],
                     "seconds": num(result["projection"]["seconds"])},
      "seconds": num(result["seconds"]),
  }


def measure_checkpoint(config, checkpoint: str, output: str, *, which: str = "best",
                       num_images: int = 16, points_per_class: int = 100,
                       title: Optional[str] = None) -> dict:
  """Measures a checkpoint (a udajax workdir or a converted PyTorch checkpoint) and writes
  `output`/embeddings.json, cosine.png, projection.png and embeddings.png (both in one row).

  Raises a `errors.UserError` for a bad number, a missing checkpoint or dataset."""
  from udajax import errors
  if not isinstance(num_images, int) or num_images < 1:
    raise errors.ConfigError(f"--num_images={num_images}: must be a positive number of images "
                             "per domain")
  if not isinstance(points_per_class, int) or points_per_class < 1:
    raise errors.ConfigError(f"--points_per_class={points_per_class}: must be >= 1")
  from udajax import configuration
  configuration.validate_config(config)
  errors.require_checkpoint_dir(checkpoint)
  errors.reject_remote_path(output, "--output")
  from udajax import dataset_paths
  dataset_paths.require_built(config, ("eval", "source"))  # the folders; TensorFlow not needed
  from udajax import data  # TensorFlow from here on
  from udajax import datasets
  from udajax import evaluation
  from udajax import labels as labels_lib
  output = os.path.abspath(os.path.expanduser(output))
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f"cannot create the output folder {output}: {e}") from e
  data.prepare_datasets(config, training=False)
  datasets.load_builder(config.source.name, config.source.builder_config, config.data_dir)
  variables, step = evaluation.load_checkpoint_variables(config, checkpoint, which)
  from udajax import embedding_plots
  from udajax import train_step as ts
  replicated = ts.replicate(variables)
  result = measure(config, replicated["params"], replicated.get("batch_stats", {}),
                   num_images=num_images, points_per_class=points_per_class)
  names = labels_lib.class_names(config.num_classes)
  record = dict(result_to_json(result, names), checkpoint=checkpoint, step=step,
                rho=float(config.loss.sparsity_rho))
  if jax.process_index() == 0:
    with open(os.path.join(output, "embeddings.json"), "w") as f:
      json.dump(record, f, indent=1, allow_nan=False)
      f.write("\n")
    embedding_plots.save(embedding_plots.cosine_figure(result, names, title=title),
                         os.path.join(output, "cosine.png"))
    embedding_plots.save(embedding_plots.projection_figure(result, names, title=title),
                         os.path.join(output, "projection.png"))
    embedding_plots.save(embedding_plots.overview_figure(result, names, title=title),
                         os.path.join(output, "embeddings.png"))
  return record


# ----------------------------------------------------------------------------- command line


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A udajax workdir or a directory written by "
                      "data_prep/convert_torch_checkpoint.py.")
  flags.DEFINE_enum("which", "best", ["best", "latest"],
                    "From a workdir: its best checkpoint by eval score or its latest.")
  flags.DEFINE_string("output", None, "Folder for the PNGs and embeddings.json (created).")
  flags.DEFINE_integer("num_images", None, "Images per domain (default: "
                       "config.eval.embedding_images, or 16 when that is 0).")
  flags.DEFINE_integer("points_per_class", None, "Projection sample cap per class and domain "
                       "(default: config.eval.embedding_points_per_class).")
  flags.DEFINE_string("title", None, "A title over the pictures (default: the checkpoint).")
  flags.mark_flags_as_required(["config", "checkpoint", "output"])


def main(argv):
  del argv
  from absl import flags
  from udajax import cli
  from udajax import errors
  f = flags.FLAGS
  config = f.config
  n = f.num_images if f.num_images is not None else (config.eval.embedding_images or 16)
  k = (f.points_per_class if f.points_per_class is not None
       else config.eval.embedding_points_per_class)
  try:
    record = measure_checkpoint(config, f.checkpoint, f.output, which=f.which, num_images=n,
                                points_per_class=k, title=f.title or f.checkpoint)
  except errors.USER_ERRORS as e:
    cli.fail(str(e))
  if jax.process_index() > 0:
    return
  step = "" if record["step"] is None else f" (step {record['step']})"
  print(f"{f.checkpoint}{step}: {record['num_images']['source']} source and "
        f"{record['num_images']['target']} target images, classes from "
        f"{record['assignment']['source']} / {record['assignment']['target']}")
  for key, value in record["scalars"].items():
    print(f"  {key:30s} {'n/a' if value is None else f'{value:.4f}'}")
  print(f"written to {os.path.abspath(os.path.expanduser(f.output))}", flush=True)


if __name__ == "__main__":
  from absl import app
  from udajax import cli as _cli
  _define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
