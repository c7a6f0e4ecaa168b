"""The feature-space statistics and metrics of `udajax.embeddings`, as pure functions (jax and
numpy only): per-class counts, centroids and squared distances merged over batches and devices;
centroid cosines, orthogonality, alignment, clustering ratio and active channels; the
class-balanced feature sample and its 2-D PCA. Definitions: the docstring of
`udajax/embeddings.py` and docs/EMBEDDINGS.md.
"""

import functools
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

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
