"""Losses of the paper: source cross-entropy, feature regularisation, IW max-square.

* `cross_entropy`: mean over the labelled pixels.
* `feature_regularization`: clustering (`f_dist_source`, `f_dist_target`, `c_dist`),
  orthogonality (`ortho_loss`) and sparsity (`sparse_loss`) on the encoder features, with
  optional centroid smoothing (`CentroidState`).
* `iw_max_square_loss`: the image-wise weighted max-square entropy term ("EM").
* `global_sum`, `use_locally`: cross-device sums for losses over the global batch.

Shapes: features `(B, h, w, F)`, probabilities `(B, H, W, C)` (softmax of the logits at the
input size), logits `(B, H, W, C)`, labels `(B, H, W)` int where any value outside [0, C) is
ignored (255 in the label maps). Pure jax with static shapes (one-hot matrices instead of loops
over classes), so every loss jits once. Needs jax only (no TensorFlow).

With `axis_name` (inside `jax.pmap`) every loss is a global-batch loss, and each device's
gradient w.r.t. its own inputs is its slice of the single-device gradient: parameter gradients
must be summed (`psum`, not `pmean`) over devices.

Formulas, gradient conventions, the degenerate cases that return finite values instead of NaN,
and how this module is tested: docs/LOSSES.md.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from udajax import ops

_HIGHEST = jax.lax.Precision.HIGHEST  # exact f32 sums on GPU/TPU too (no TF32/bf16 passes)


class CentroidState(NamedTuple):
  """Running class centroids for centroid smoothing (lives in the train state).

  Attributes:
    centroids: (C, F) float32, the last smoothed centroid of every class seen so far (0 rows
      for classes never seen).
    seen: (C,) bool, True for classes that had at least one assigned feature at some update.
  """
  centroids: jax.Array
  seen: jax.Array


def init_centroid_state(num_classes: int, feat_dim: int) -> CentroidState:
  """Empty state: no class seen yet (the first update then uses the current centroids)."""
  return CentroidState(centroids=jnp.zeros((num_classes, feat_dim), jnp.float32),
                       seen=jnp.zeros((num_classes,), bool))


# ----------------------------------------------------------------------------------------------
# Cross-device sums with per-device gradients.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _psum_local_grad(tree, axis_name):
  return jax.lax.psum(tree, axis_name)


def _psum_local_grad_fwd(tree, axis_name):
  return jax.lax.psum(tree, axis_name), None


def _psum_local_grad_bwd(axis_name, _, cotangent):
  del axis_name
  return (cotangent,)


_psum_local_grad.defvjp(_psum_local_grad_fwd, _psum_local_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _identity_psum_grad(tree, axis_name):
  del axis_name
  return tree


def _identity_psum_grad_fwd(tree, axis_name):
  del axis_name
  return tree, None


def _identity_psum_grad_bwd(axis_name, _, cotangent):
  return (jax.lax.psum(cotangent, axis_name),)


_identity_psum_grad.defvjp(_identity_psum_grad_fwd, _identity_psum_grad_bwd)


def global_sum(tree, axis_name=None):
  """Sum of a pytree of float arrays over the devices of `axis_name` (identity when None).

  The result is the same on every device. The backward pass is the identity: when everything
  downstream is computed identically on every device, each device's gradient w.r.t. its local
  summands is its slice of the single-device gradient (docs/LOSSES.md).
  """
  if axis_name is None:
    return tree
  return _psum_local_grad(tree, axis_name)


def use_locally(tree, axis_name=None):
  """Marks a device-invariant value (e.g. a global centroid) that enters per-device terms.

  Identity forward; the backward psums the cotangent, since each device only holds the
  contribution of its own positions to the gradient w.r.t. the shared value.
  """
  if axis_name is None:
    return tree
  return _identity_psum_grad(tree, axis_name)


def _axis_size(axis_name) -> jax.Array:
  return 1 if axis_name is None else jax.lax.psum(1, axis_name)


# ----------------------------------------------------------------------------------------------
# Small helpers.


def _safe_div(num, den):
  """num / den where den > 0, else 0 (den carries no gradient here)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _abs(x):
  """|x| with derivative sign(x), 0 at 0 (torch.norm's convention, unlike jnp.abs)."""
  return x * jax.lax.stop_gradient(jnp.sign(x))


def _abs_pow(x, p: float):
  """|x|^p elementwise, p >= 1, with zero gradient at x = 0."""
  if p == 1:
    return _abs(x)
  if p == 2:
    return x * x
  return _abs(x) ** p


def _safe_root(s, p: float):
  """s^(1/p) for s >= 0 with value and gradient 0 at s = 0 (torch.norm at a zero tensor)."""
  if p == 1:
    return s
  ok = s > 0
  safe = jnp.where(ok, s, 1.0)
  root = jnp.sqrt(safe) if p == 2 else safe ** (1.0 / p)
  return jnp.where(ok, root, 0.0)


def _float(x):
  """At least float32 (bf16/f16 inputs are upcast; float64 stays, for tests under x64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _flatten(feat):
  """(B, h, w, F) -> (B*h*w, F), at least float32."""
  return _float(feat.reshape(-1, feat.shape[-1]))


def _assign_bilinear(prob, hw):
  """Argmax of the align_corners-bilinear downsampled probabilities, (B, h, w) int32."""
  small = ops.resize_bilinear_align_corners(jax.lax.stop_gradient(prob), hw)
  return jnp.argmax(small, axis=-1).astype(jnp.int32)


def _assign_nearest(prob, hw):
  """Full-size argmax, PyTorch-nearest downsampled, (B, h, w) int32."""
  picked = ops.resize_nearest(jax.lax.stop_gradient(prob), hw)
  return jnp.argmax(picked, axis=-1).astype(jnp.int32)


def _assign_labels(labels, hw):
  """PyTorch-nearest downsampled labels, (B, h, w) int32 (out-of-range values stay ignored)."""
  return ops.resize_nearest(labels, hw).astype(jnp.int32)


def _one_hot(assign, num_classes, dtype):
  """(B, h, w) int -> (B*h*w, C); rows of ignored positions (outside [0, C)) are 0."""
  return jax.nn.one_hot(assign.reshape(-1), num_classes, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Cross-entropy.


def cross_entropy(logits, labels, *, axis_name=None):
  """Pixel-wise cross-entropy, mean over non-ignored pixels (global when `axis_name`).

  Args:
    logits: (B, H, W, C).
    labels: (B, H, W) int; any value outside [0, C) is ignored.
    axis_name: pmap axis name; sums and counts then run over all devices.
  Returns:
    scalar float32; 0 when no pixel is labelled.
  """
  num_classes = logits.shape[-1]
  logp = jax.nn.log_softmax(_float(logits), axis=-1)
  target = jax.nn.one_hot(labels, num_classes, dtype=logp.dtype)  # ignored -> all-zero rows
  nll_sum = -jnp.sum(target * logp)
  count = jnp.sum(target)
  nll_sum, count = global_sum((nll_sum, count), axis_name)
  return _safe_div(nll_sum, count)


# ----------------------------------------------------------------------------------------------
# Feature regularisation: clustering, orthogonality, sparsity.


def _centroids(feats, onehots, axis_name):
  """Class means of all (domain) features. Returns ((C, F) centroids, (C,) bool present)."""
  sums = sum(jnp.einsum("nc,nf->cf", a, x, precision=_HIGHEST) for x, a in zip(feats, onehots))
  counts = sum(jnp.sum(a, axis=0) for a in onehots)
  sums, counts = global_sum((sums, counts), axis_name)
  centroids = sums / jnp.maximum(counts, 1.0)[:, None]
  return centroids, counts > 0


def _smooth(centroids, present, state: CentroidState, alpha: float):
  """One smoothing update (docs/LOSSES.md). Returns (centroids, present, new state)."""
  prev = jax.lax.stop_gradient(
      jnp.where(state.seen[:, None], state.centroids, centroids))
  current = jnp.where(present[:, None], centroids, prev)
  smoothed = alpha * current + (1.0 - alpha) * prev
  seen = jnp.logical_or(state.seen, present)
  smoothed = jnp.where(seen[:, None], smoothed, 0.0)
  new_state = CentroidState(centroids=jax.lax.stop_gradient(smoothed), seen=seen)
  return smoothed, seen, new_state


def _feature_to_centroid(feat, onehot, centroids, p, axis_name):
  """f_dist of one domain: mean over its classes of ||c_j - F_j||_p / (N_j * F)."""
  feat_dim = feat.shape[-1]
  own_centroid = jnp.einsum("nc,cf->nf", onehot, use_locally(centroids, axis_name),
                            precision=_HIGHEST)  # 0 rows for ignored positions
  per_position = jnp.sum(_abs_pow(own_centroid - feat, p), axis=-1)  # (N,)
  per_class = jnp.einsum("nc,n->c", onehot, per_position, precision=_HIGHEST)  # (C,)
  counts = jnp.sum(onehot, axis=0)
  per_class, counts = global_sum((per_class, counts), axis_name)
  dist = _safe_div(_safe_root(per_class, p), counts * feat_dim)
  has = (counts > 0).astype(jnp.float32)
  return _safe_div(jnp.sum(has * dist), jnp.sum(has))


def _centroid_to_centroid(centroids, present, p):
  """c_dist: mean over present i of ||c_i - C_{-i}||_p / ((K - 1) * F); 0 when K < 2."""
  num_classes, feat_dim = centroids.shape
  pm = present.astype(jnp.float32)
  pair_mask = pm[:, None] * pm[None, :] * (1.0 - jnp.eye(num_classes, dtype=jnp.float32))
  diff = centroids[:, None, :] - centroids[None, :, :]  # (C, C, F)
  pair = jnp.sum(_abs_pow(diff, p), axis=-1)  # (C, C)
  norms = _safe_root(jnp.sum(pair_mask * pair, axis=1), p)  # (C,)
  k = jnp.sum(pm)
  dist = _safe_div(norms, (k - 1.0) * feat_dim)
  return jnp.where(k >= 2, jnp.sum(pm * dist) / jnp.maximum(k, 1.0), 0.0)


def _orthogonality(feats, centroids, present, temperature, axis_name):
  """-mean over (positions x K) of p log p, p = softmax_present(<x, c> / T)."""
  pm = present.astype(jnp.float32)
  local_centroids = use_locally(centroids, axis_name)
  total = 0.0
  count = 0
  for x in feats:  # the two domains (a static, two-element loop)
    z = jnp.einsum("nf,cf->nc", x, local_centroids, precision=_HIGHEST) / temperature
    top = jax.lax.stop_gradient(jnp.max(jnp.where(present[None, :], z, -jnp.inf), axis=-1,
                                        keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    z = jnp.where(present[None, :], z - top, 0.0)
    norm = jnp.sum(pm[None, :] * jnp.exp(z), axis=-1, keepdims=True)  # >= 1 if any present
    log_norm = jnp.log(jnp.where(norm > 0, norm, 1.0))
    logp = z - log_norm
    total = total + jnp.sum(pm[None, :] * jnp.exp(logp) * logp)
    count += x.shape[0]
  total = global_sum(total, axis_name)
  positions = count * _axis_size(axis_name)
  k = jnp.sum(pm)
  return -_safe_div(total, positions * k)


def _sparsity(centroids, present, rho, power):
  """-mean over (K x F) of (c_j / max_f c_jf - rho)^power (|.| unless power is even)."""
  num_classes, feat_dim = centroids.shape
  pm = present.astype(jnp.float32)
  first_max = jnp.argmax(centroids, axis=-1)[:, None]
  top = jnp.take_along_axis(centroids, jax.lax.stop_gradient(first_max), axis=-1)  # (C, 1)
  top = jnp.where(top == 0, 1.0, top)
  shifted = centroids / top - rho
  exponent = int(power)
  term = shifted ** exponent
  if power % 2 != 0:
    term = _abs(term)
  k = jnp.sum(pm)
  return -_safe_div(jnp.sum(pm[:, None] * term), k * feat_dim)


def feature_regularization(source_feat, source_prob, target_feat, target_prob, *, num_classes,
                           cluster_norm_order=1, ortho_temperature=1.0, sparsity_rho=0.5,
                           sparsity_power=2.0, source_labels=None, axis_name=None,
                           centroid_smoothing=None, centroid_state=None):
  """Clustering, orthogonality and sparsity terms on the encoder features (docs/LOSSES.md).

  Args:
    source_feat: (Bs, hs, ws, F) source features (gradients flow into them).
    source_prob: (Bs, Hs, Ws, C) source softmax at input size (assignments only; no gradient).
    target_feat: (Bt, ht, wt, F) target features.
    target_prob: (Bt, Ht, Wt, C) target softmax at input size.
    num_classes: C (static).
    cluster_norm_order: p >= 1 of d(X) = ||X||_p / numel(X) (static).
    ortho_temperature: softmax temperature of the orthogonality term.
    sparsity_rho: rho of the sparsity term.
    sparsity_power: exponent of the sparsity term (static; used as int(power)).
    source_labels: optional (Bs, Hs, Ws) int labels; then source assignments come from them
      (values outside [0, C) take part in no class).
    axis_name: pmap axis name; every sum and count then runs over all devices.
    centroid_smoothing: None (or < 0) for no smoothing, else alpha in [0, 1] (static).
    centroid_state: previous `CentroidState` when smoothing (an empty one is used when None).
  Returns:
    dict with scalars c_dist, f_dist_source, f_dist_target, ortho_loss, sparse_loss and, when
    smoothing is on or a state was given, centroid_state (the new state, no gradient; the
    given one unchanged when smoothing is off). The clustering loss is
    lambda_cl * (f_dist_source + f_dist_target - c_dist).
  """
  if source_prob.shape[-1] != num_classes or target_prob.shape[-1] != num_classes:
    raise ValueError(f"probabilities have {source_prob.shape[-1]} / {target_prob.shape[-1]} "
                     f"classes, expected num_classes={num_classes}")
  if cluster_norm_order < 1:
    raise ValueError(f"cluster_norm_order must be >= 1, got {cluster_norm_order}")
  smoothing = centroid_smoothing is not None and centroid_smoothing >= 0
  if smoothing and centroid_smoothing > 1:
    raise ValueError(f"centroid_smoothing must be in [0, 1], got {centroid_smoothing}")
  feat_dim = source_feat.shape[-1]
  if target_feat.shape[-1] != feat_dim:
    raise ValueError(f"feature sizes differ: {feat_dim} vs {target_feat.shape[-1]}")

  src_hw, tgt_hw = source_feat.shape[1:3], target_feat.shape[1:3]
  feats = (_flatten(source_feat), _flatten(target_feat))
  dt = feats[0].dtype
  state = centroid_state
  if smoothing and state is None:
    state = init_centroid_state(num_classes, feat_dim)

  def centroids_for(onehots, state):
    centroids, present = _centroids(feats, onehots, axis_name)
    if smoothing:
      return _smooth(centroids, present, state, float(centroid_smoothing))
    return centroids, present, state

  # Pass 1: "bilinear" assignments -> clustering terms.
  if source_labels is not None:
    src_assign = _assign_labels(source_labels, src_hw)
  else:
    src_assign = _assign_bilinear(source_prob, src_hw)
  onehots = (_one_hot(src_assign, num_classes, dt),
             _one_hot(_assign_bilinear(target_prob, tgt_hw), num_classes, dt))
  centroids, present, state = centroids_for(onehots, state)
  p = cluster_norm_order
  out = {
      "c_dist": _centroid_to_centroid(centroids, present, p),
      "f_dist_source": _feature_to_centroid(feats[0], onehots[0], centroids, p, axis_name),
      "f_dist_target": _feature_to_centroid(feats[1], onehots[1], centroids, p, axis_name),
  }

  # Pass 2: "nearest" assignments -> orthogonality and sparsity terms.
  if source_labels is None:
    src_onehot = _one_hot(_assign_nearest(source_prob, src_hw), num_classes, dt)
  else:
    src_onehot = onehots[0]  # labels are nearest-downsampled in both passes
  onehots = (src_onehot, _one_hot(_assign_nearest(target_prob, tgt_hw), num_classes, dt))
  centroids, present, state = centroids_for(onehots, state)
  out["ortho_loss"] = _orthogonality(feats, centroids, present, ortho_temperature, axis_name)
  out["sparse_loss"] = _sparsity(centroids, present, sparsity_rho, sparsity_power)
  if state is not None:
    out["centroid_state"] = state
  return out


# ----------------------------------------------------------------------------------------------
# Entropy term: image-wise weighted max-square.


def iw_max_square_loss(target_prob, ratio=0.2, *, axis_name=None):
  """Image-wise weighted max-square loss (the paper's "EM" term).

  Args:
    target_prob: (B, H, W, C) softmax probabilities.
    ratio: IW ratio; weights w_b[j] = 1 / max(hist_b[j]^ratio * (H W)^(1 - ratio), 1).
    axis_name: pmap axis name; B is then the global batch and the sum is global.
  Returns:
    scalar -sum_{b, pixels, j} w_b[argmax] p_j^2 / (B * C); weights carry no gradient.
  """
  batch, num_classes = target_prob.shape[0], target_prob.shape[-1]
  prob = _float(target_prob)
  assign = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(prob), axis=-1), num_classes,
                          dtype=prob.dtype)  # (B, H, W, C)
  hist = jnp.sum(assign, axis=(1, 2))  # (B, C)
  total = jnp.sum(hist, axis=-1, keepdims=True)
  weights = 1.0 / jnp.maximum(hist ** ratio * total ** (1.0 - ratio), 1.0)
  pixel_weight = jnp.einsum("bhwc,bc->bhw", assign, weights, precision=_HIGHEST)
  local = jnp.sum(jax.lax.stop_gradient(pixel_weight) * jnp.sum(prob * prob, axis=-1))
  total_sum = global_sum(local, axis_name)
  return -total_sum / (batch * _axis_size(axis_name) * num_classes)
