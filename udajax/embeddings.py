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

Importing this module needs jax and numpy only (no TensorFlow, no matplotlib): the data
pipeline and the plots are imported when used.
"""

import functools
import json
import math
import os
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from udajax import ops

AXIS = "batch"
DOMAINS = ("source", "target")
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- statistics


def class_statistics(features, classes, num_classes: int, axis_name=None) -> Dict[str, jax.Array]:
  """Per-class count, centroid and sum of squared distances to the centroid.

  Args:
    features: (B, h, w, F) float features. classes: (B, h, w) int; values outside
      [0, num_classes) (ignore labels, padding) belong to no class.
    axis_name: pmap axis to sum over (all devices' features count as one set), or None.
  Returns:
    {"count": (C,) float32, "mean": (C, F) float32 (0 for an absent class),
     "m2": (C,) float32 = sum over the class's features of ||x - mean||^2}.
  """
  x = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
  onehot = jax.nn.one_hot(classes.reshape(-1), num_classes, dtype=jnp.float32)  # (P, C)
  psum = (lambda v: jax.lax.psum(v, axis_name)) if axis_name else (lambda v: v)
  count = psum(jnp.sum(onehot, axis=0))
  sums = psum(jnp.matmul(onehot.T, x, precision=_HIGHEST))
  mean = sums / jnp.maximum(count, 1.0)[:, None]
  # Distances to the (global) centroid of each feature's class, in a second pass over the batch.
  d2 = jnp.sum(jnp.square(x - jnp.matmul(onehot, mean, precision=_HIGHEST)), axis=-1)
  m2 = psum(jnp.matmul(d2, onehot, precision=_HIGHEST))
  return {"count": count, "mean": mean, "m2": m2}


def merge_statistics(a: Dict[str, jax.Array], b: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """The statistics of the union of two disjoint feature sets (Chan et al.'s pairwise update:
  exact, and free of the cancellation of sum(x^2) - n mean^2)."""
  n = a["count"] + b["count"]
  wb = jnp.where(n > 0, b["count"] / jnp.maximum(n, 1.0), 0.0)
  delta = b["mean"] - a["mean"]
  mean = a["mean"] + delta * wb[:, None]
  m2 = a["m2"] + b["m2"] + jnp.sum(jnp.square(delta), axis=-1) * a["count"] * wb
  return {"count": n, "mean": mean, "m2": m2}


def empty_statistics(num_classes: int, feature_dim: int) -> Dict[str, jax.Array]:
  return {"count": jnp.zeros((num_classes,)), "mean": jnp.zeros((num_classes, feature_dim)),
          "m2": jnp.zeros((num_classes,))}


# ----------------------------------------------------------------------------- metrics


def cosine_matrix(a, b, present_a, present_b):
  """(C, C) cosine similarity of the rows of a (C, F) and b (C, F); NaN where a row is absent.

  A zero row has cosine 0 with everything (its direction is undefined)."""
  na = jnp.linalg.norm(a, axis=-1)
  nb = jnp.linalg.norm(b, axis=-1)
  dots = jnp.matmul(a, b.T, precision=_HIGHEST)
  cos = dots / jnp.maximum(na[:, None] * nb[None, :], 1e-30)
  return jnp.where(present_a[:, None] & present_b[None, :], cos, jnp.nan)


def _masked_mean(values, mask):
  """Mean of `values` where `mask`; NaN when the mask is empty."""
  n = jnp.sum(mask)
  return jnp.where(n > 0, jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(n, 1), jnp.nan)


def orthogonality(cos, present):
  """Mean |cos| over ordered pairs i != j of present classes (NaN with fewer than two)."""
  c = cos.shape[0]
  pairs = present[:, None] & present[None, :] & ~jnp.eye(c, dtype=bool)
  return _masked_mean(jnp.abs(cos), pairs)


def alignment(cos_source_target, present_source, present_target):
  """Mean of the diagonal cos(source c_j, target c_j) over classes present in both domains."""
  return _masked_mean(jnp.diagonal(cos_source_target), present_source & present_target)


def clustering_ratio(stats):
  """(C,) RMS distance of a class's features to its centroid / mean distance of the centroid to
  the other present centroids; NaN for an absent class or with fewer than two present classes."""
  present = stats["count"] > 0
  spread = jnp.sqrt(stats["m2"] / jnp.maximum(stats["count"], 1.0))
  diff = stats["mean"][:, None, :] - stats["mean"][None, :, :]
  dist = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))  # (C, C), exact (no |a|^2 + |b|^2 - 2ab)
  others = present[None, :] & ~jnp.eye(present.shape[0], dtype=bool)
  num_others = jnp.sum(others, axis=1)
  between = jnp.sum(jnp.where(others, dist, 0.0), axis=1) / jnp.maximum(num_others, 1)
  ok = present & (num_others > 0) & (between > 0)
  return jnp.where(ok, spread / jnp.where(ok, between, 1.0), jnp.nan)


def active_channels(centroids, present, rho: float):
  """(C,) fraction of channels f with c_jf / max_f' c_jf' > rho (a centroid whose maximum is
  <= 0 is divided by 1, as the sparsity loss does); NaN for an absent class."""
  top = jnp.max(centroids, axis=-1, keepdims=True)
  normalized = centroids / jnp.where(top > 0, top, 1.0)
  frac = jnp.mean((normalized > rho).astype(jnp.float32), axis=-1)
  return jnp.where(present, frac, jnp.nan)


@functools.partial(jax.jit, static_argnames=("rho",))
def embedding_metrics(source: Dict[str, jax.Array], target: Dict[str, jax.Array], *,
                      rho: float) -> Dict[str, jax.Array]:
  """Every matrix and scalar of the module docstring from the per-domain statistics
  (`class_statistics`, merged over all batches). Runs on device; C = classes, F = channels.

  Returns {"cosine/source", "cosine/target", "cosine/source_target": (C, C);
  "clustering/{source,target,joint}", "active_channels/{source,target}", "count/{source,target}":
  (C,); "orthogonality/{source,target}", "alignment", "clustering/<domain>/mean",
  "active_channels/<domain>/mean": scalars}.
  """
  out = {}
  present = {}
  stats = {"source": source, "target": target, "joint": merge_statistics(source, target)}
  for d, s in stats.items():
    present[d] = s["count"] > 0
    ratio = clustering_ratio(s)
    out[f"clustering/{d}"] = ratio
    out[f"clustering/{d}/mean"] = _masked_mean(ratio, jnp.isfinite(ratio))
  for d in DOMAINS:
    s = stats[d]
    out[f"count/{d}"] = s["count"]
    cos = cosine_matrix(s["mean"], s["mean"], present[d], present[d])
    out[f"cosine/{d}"] = cos
    out[f"orthogonality/{d}"] = orthogonality(cos, present[d])
    active = active_channels(s["mean"], present[d], rho)
    out[f"active_channels/{d}"] = active
    out[f"active_channels/{d}/mean"] = _masked_mean(active, present[d])
  cos_st = cosine_matrix(source["mean"], target["mean"], present["source"], present["target"])
  out["cosine/source_target"] = cos_st
  out["alignment"] = alignment(cos_st, present["source"], present["target"])
  return out


SCALAR_KEYS = ("orthogonality/source", "orthogonality/target", "alignment",
               "clustering/source/mean", "clustering/target/mean", "clustering/joint/mean",
               "active_channels/source/mean", "active_channels/target/mean")


# ----------------------------------------------------------------------------- sample


def class_sample(features, classes, num_classes: int, points_per_class: int, key):
  """Up to `points_per_class` features of each class, uniformly at random without replacement.

  Each position draws a uniform key in [0, 1); per class the positions with the largest keys are
  kept. The largest keys of a union are the largest of the parts' largest, so merging per-batch
  samples by key (`merge_samples`) gives a uniform sample of all features seen.
  Args: features (B, h, w, F), classes (B, h, w) int (outside [0, C): no class).
  Returns: {"key": (C, k) float32, -1 where the class has fewer than k features;
    "features": (C, k, F)}, k = min(points_per_class, B*h*w).
  """
  x = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
  flat = classes.reshape(-1)
  u = jax.random.uniform(key, flat.shape)
  member = flat[None, :] == jnp.arange(num_classes)[:, None]  # (C, P)
  scores = jnp.where(member, u[None, :], -1.0)
  k = min(points_per_class, flat.shape[0])
  keys, index = jax.lax.top_k(scores, k)
  return {"key": keys, "features": x[index]}


def merge_samples(pool: Optional[dict], new: dict, points_per_class: int) -> dict:
  """Host-side merge of two `class_sample` results (numpy): per class the largest keys."""
  if pool is not None:
    new = {k: np.concatenate([pool[k], new[k]], axis=1) for k in ("key", "features")}
  order = np.argsort(-new["key"], axis=1, kind="stable")[:, :points_per_class]
  return {"key": np.take_along_axis(new["key"], order, axis=1),
          "features": np.take_along_axis(new["features"], order[..., None], axis=1)}


def sample_points(sample: dict):
  """(features (n, F), classes (n,)) of the valid entries of a merged sample."""
  valid = sample["key"] >= 0
  classes = np.broadcast_to(np.arange(valid.shape[0])[:, None], valid.shape)
  return sample["features"][valid], classes[valid]


def project_2d(features: np.ndarray, *, iterations: int = 6, oversample: int = 10):
  """PCA of (n, F) features to (n, 2): the two leading principal axes of the centred sample.

  A linear projection: what lies apart in the picture lies at least as far apart in the feature
  space, and cluster sizes are comparable across the picture. The axes are found by randomized
  subspace iteration (Halko et al. 2011; fixed seed, so deterministic): O(n F) per iteration
  instead of a full SVD's O(n F min(n, F)), which matters at 2048 channels. The sign of each
  axis is fixed so that its largest loading is positive. Returns (points (n, 2), explained
  variance ratio (2,) of the centred sample).
  """
  x = np.asarray(features, np.float64)
  x = x - x.mean(axis=0, keepdims=True)
  n, dim = x.shape
  total = float(np.sum(x * x))
  if n < 2 or total == 0.0:
    return np.zeros((n, 2)), np.zeros((2,))
  rank = min(2 + oversample, n, dim)
  q = np.linalg.qr(x @ np.random.default_rng(0).normal(size=(dim, rank)))[0]
  for _ in range(iterations):  # power iterations sharpen the leading subspace
    q = np.linalg.qr(x @ np.linalg.qr(x.T @ q)[0])[0]
  _, s, vt = np.linalg.svd(q.T @ x, full_matrices=False)
  axes = np.zeros((2, dim))
  axes[:min(2, len(s))] = vt[:2]
  signs = np.sign(axes[np.arange(2), np.argmax(np.abs(axes), axis=1)])
  axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
  ratio = np.array([s[i] ** 2 / total if i < len(s) else 0.0 for i in range(2)])
  return x @ axes.T, ratio


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
  from udajax import data  # TensorFlow from here on
  from udajax import datasets
  from udajax import evaluation
  from udajax import labels as labels_lib
  configuration.validate_config(config)
  output = os.path.abspath(os.path.expanduser(output))
  try:
    os.makedirs(output, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f"cannot create the output folder {output}: {e}") from e
  data.prepare_datasets(config, training=False)
  datasets.load_builder(config.source.name, config.source.builder_config, config.data_dir)
  variables, step = evaluation.load_checkpoint_variables(config, checkpoint, which)
  import flax
  from udajax import embedding_plots
  replicated = flax.jax_utils.replicate(variables)
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
