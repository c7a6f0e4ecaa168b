"""udajax.losses: hand-checked values, a loop-over-classes torch transcription, degenerate inputs.

Relative errors are measured as max|ours - ref| / max|ref| (per term or per gradient array).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests import loss_reference as ref
from udajax import losses

KEYS = ("c_dist", "f_dist_source", "f_dist_target", "ortho_loss", "sparse_loss")

# Eager jax dispatches hundreds of tiny ops one by one (slow on CPU): tests run everything jitted.
fr = jax.jit(losses.feature_regularization,
             static_argnames=("num_classes", "cluster_norm_order", "sparsity_power",
                              "centroid_smoothing", "axis_name"))


def rel_err(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  scale = max(np.max(np.abs(theirs)), 1e-30)
  return float(np.max(np.abs(ours - theirs)) / scale)


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def entropy2(delta):
  """Entropy of softmax([delta, 0])."""
  q = softmax(np.array([delta, 0.0]))
  return float(-(q * np.log(q)).sum())


def one_hot_probs(classes, num_classes, peak=0.8):
  """(..., ) int -> (..., C) probabilities peaked at the given classes."""
  classes = np.asarray(classes)
  p = np.full(classes.shape + (num_classes,), (1 - peak) / (num_classes - 1), np.float32)
  np.put_along_axis(p, classes[..., None], peak, axis=-1)
  return p


# ------------------------------------------------------------------------------------------------
# Hand-checkable values.


def _hand_inputs():
  # C = 3, F = 2; features and probabilities at the same size, so no resizing happens.
  sf = np.array([[[[1, 0], [0, 2]]]], np.float32)  # (1, 1, 2, 2): class 0, class 1
  tf = np.array([[[[3, 0], [0, 4]]]], np.float32)  # class 0, class 1
  sp = one_hot_probs([[[0, 1]]], 3)
  tp = one_hot_probs([[[0, 1]]], 3)
  return sf, sp, tf, tp


@pytest.mark.parametrize("p", [1, 2])
def test_feature_regularization_hand_values(p):
  sf, sp, tf, tp = _hand_inputs()
  out = fr(sf, sp, tf, tp, num_classes=3, cluster_norm_order=p)
  # centroids: c0 = (2, 0), c1 = (0, 3); class 2 absent.
  # f_dist: every feature is at distance 1 (a single nonzero coordinate) from its centroid,
  # numel = 1 * 2 -> 0.5 per class and domain.
  np.testing.assert_allclose(out["f_dist_source"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(out["f_dist_target"], 0.5, rtol=1e-6)
  # c_dist: ||c0 - c1||_p / (1 * 2): p=1 -> (2 + 3) / 2; p=2 -> sqrt(13) / 2.
  np.testing.assert_allclose(out["c_dist"], 2.5 if p == 1 else np.sqrt(13) / 2, rtol=1e-6)
  # ortho: <x, c> for (1,0), (0,2), (3,0), (0,4) against c0, c1: (2,0), (0,6), (6,0), (0,12);
  # two present classes -> entropy of a 2-way softmax, mean over 4 positions x 2 classes.
  expected = sum(entropy2(dlt) for dlt in (2, 6, 6, 12)) / 8
  np.testing.assert_allclose(out["ortho_loss"], expected, rtol=1e-6)
  # sparse: normalised centroids (1, 0), (0, 1): (+-0.5)^2 = 0.25 everywhere -> -0.25.
  np.testing.assert_allclose(out["sparse_loss"], -0.25, rtol=1e-6)
  if p == 2:
    return
  odd = fr(sf, sp, tf, tp, num_classes=3, sparsity_power=3.0, sparsity_rho=0.5,
           ortho_temperature=2.0)
  np.testing.assert_allclose(odd["sparse_loss"], -0.125, rtol=1e-6)  # |(+-0.5)^3|
  np.testing.assert_allclose(odd["ortho_loss"],
                             sum(entropy2(dlt / 2) for dlt in (2, 6, 6, 12)) / 8, rtol=1e-6)


def test_clustering_hand_values_three_classes_and_resizing():
  # Source features (1, 1, 3, 1) from probabilities (1, 1, 4, 3): align_corners bilinear samples
  # the 4 pixels at 0, 1.5, 3; nearest picks pixels 0, 1, 2 (floor(dst * 4 / 3)).
  sp = np.zeros((1, 1, 4, 3), np.float32)
  sp[0, 0, 0] = [0.1, 0.1, 0.8]
  sp[0, 0, 1] = [0.6, 0.4, 0.0]
  sp[0, 0, 2] = [0.0, 0.45, 0.55]
  sp[0, 0, 3] = [0.9, 0.05, 0.05]
  hs = (1, 3)
  bil = np.asarray(losses._assign_bilinear(sp, hs))[0, 0]
  near = np.asarray(losses._assign_nearest(sp, hs))[0, 0]
  # bilinear: pixel 0 -> 2; (0.3, 0.425, 0.275) -> 1; pixel 3 -> 0. nearest: 2, 0, 2.
  np.testing.assert_array_equal(bil, [2, 1, 0])
  np.testing.assert_array_equal(near, [2, 0, 2])
  labels = np.array([[[1, 255, 7, 0, 2, 2]]], np.int32)  # (1, 1, 6) -> (1, 1, 3): 0, 2, 4
  np.testing.assert_array_equal(np.asarray(losses._assign_labels(labels, hs))[0, 0], [1, 7, 2])

  sf = np.array([[[[1.0], [2.0], [4.0]]]], np.float32)  # (1, 1, 3, 1)
  tf = np.array([[[[8.0]]]], np.float32)  # (1, 1, 1, 1); target prob 1 x 1 pixel of class 2
  tp = one_hot_probs([[[2]]], 3)
  out = fr(sf, sp, tf, tp, num_classes=3, cluster_norm_order=1)
  # bilinear pass: class 2 = {1 (src), 8 (tgt)} -> 4.5; class 1 = {2} -> 2; class 0 = {4} -> 4.
  # f_dist_source = mean(|4.5 - 1|, |2 - 2|, |4 - 4|) = 3.5 / 3; f_dist_target = |4.5 - 8| = 3.5.
  np.testing.assert_allclose(out["f_dist_source"], 3.5 / 3, rtol=1e-6)
  np.testing.assert_allclose(out["f_dist_target"], 3.5, rtol=1e-6)
  # c_dist: class 0: (|4-2| + |4-4.5|)/2 = 1.25; class 1: (2 + 2.5)/2 = 2.25; class 2: (0.5+2.5)/2.
  np.testing.assert_allclose(out["c_dist"], (1.25 + 2.25 + 1.5) / 3, rtol=1e-6)
  # nearest pass: class 2 = {1, 4, 8} -> 13/3; class 0 = {2}; class 1 absent.
  c = np.array([2.0, 13.0 / 3])
  z = np.array([[1.0], [2.0], [4.0], [8.0]]) * c[None, :]
  q = softmax(z)
  np.testing.assert_allclose(out["ortho_loss"], -(q * np.log(q)).sum() / 8, rtol=1e-5)
  # sparse with F = 1: every normalised centroid is 1 -> -(1 - 0.5)^2.
  np.testing.assert_allclose(out["sparse_loss"], -0.25, rtol=1e-6)

  with_labels = fr(sf, sp, tf, tp, num_classes=3, source_labels=labels)
  # labels (1, 7->ignored, 2): class 1 = {1}, class 2 = {4, 8} -> 6; position 1 in no class.
  np.testing.assert_allclose(with_labels["f_dist_source"], (0 + 2) / 2, rtol=1e-6)
  np.testing.assert_allclose(with_labels["f_dist_target"], 2, rtol=1e-6)
  np.testing.assert_allclose(with_labels["c_dist"], 5, rtol=1e-6)


def test_cross_entropy_hand_values():
  logits = np.array([[[[0.0, 0.0], [np.log(3.0), 0.0], [5.0, 1.0]]]], np.float32)  # (1,1,3,2)
  labels = np.array([[[0, 1, 255]]], np.int32)
  # pixel 0: -log(1/2); pixel 1: -log(1/4); pixel 2 ignored.
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), (np.log(2) + np.log(4)) / 2,
                             rtol=1e-6)
  labels_neg = np.array([[[0, -1, 2]]], np.int32)  # -1 and 2 (= C) are ignored as well
  np.testing.assert_allclose(losses.cross_entropy(logits, labels_neg), np.log(2), rtol=1e-6)
  none = np.full((1, 1, 3), 255, np.int32)
  assert float(losses.cross_entropy(logits, none)) == 0.0
  g = jax.grad(lambda x: losses.cross_entropy(x, none))(jnp.asarray(logits))
  assert np.all(np.asarray(g) == 0)


def test_iw_max_square_hand_values():
  p = np.array([[[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]]]], np.float32)  # (1,1,4,2)
  # argmax 0, 0, 0, 1: hist (3, 1), 4 pixels.
  w0 = 1 / max(3 ** 0.2 * 4 ** 0.8, 1)
  w1 = 1 / max(1 ** 0.2 * 4 ** 0.8, 1)
  expected = -(w0 * (0.81 + 0.01 + 0.64 + 0.04 + 0.49 + 0.09) + w1 * (0.16 + 0.36)) / 2
  np.testing.assert_allclose(losses.iw_max_square_loss(p, 0.2), expected, rtol=1e-6)
  # ratio 0: every weight is 1 / (H W); gradient of -w p^2 / (B C) is -2 w p / (B C).
  np.testing.assert_allclose(losses.iw_max_square_loss(p, 0.0), -(p ** 2).sum() / 4 / 2,
                             rtol=1e-6)
  g = jax.grad(losses.iw_max_square_loss)(jnp.asarray(p), 0.0)
  np.testing.assert_allclose(g, -2 * p / 4 / 2, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Against the loop-over-classes torch transcription (tests/loss_reference.py).


def make_inputs(seed, batch=2, num_classes=6, feat_dim=8, src_feat_hw=(5, 7), src_hw=(17, 25),
                tgt_feat_hw=(4, 6), tgt_hw=(13, 21)):
  """Random inputs where classes 4, 5 are absent, 3 is absent from the target, 1 from labels."""
  rng = np.random.default_rng(seed)
  sl = 2.0 * rng.normal(size=(batch,) + src_hw + (num_classes,))
  tl = 2.0 * rng.normal(size=(batch,) + tgt_hw + (num_classes,))
  sl[..., 4:] -= 30.0
  tl[..., 3:] -= 30.0
  sp = softmax(sl).astype(np.float32)
  tp = softmax(tl).astype(np.float32)
  # ReLU-like features with exact zeros, like the encoder's.
  sf = np.maximum(rng.normal(size=(batch,) + src_feat_hw + (feat_dim,)) + 0.3, 0).astype(
      np.float32)
  tf = np.maximum(rng.normal(size=(batch,) + tgt_feat_hw + (feat_dim,)) + 0.3, 0).astype(
      np.float32)
  labels = rng.choice(np.array([0, 2, 3, 255, 255], np.int32), size=(batch,) + src_hw)
  return sf, sp, tf, tp, labels


@functools.partial(jax.jit, static_argnames=("num_classes", "cluster_norm_order"))
def _values_and_jacobians(sf, sp, tf, tp, labels, **kw):
  """The five terms (5,) and their Jacobians w.r.t. both feature maps; cached compilations."""
  def terms(sf, tf):
    out = losses.feature_regularization(sf, sp, tf, tp, source_labels=labels, **kw)
    return jnp.stack([out[k] for k in KEYS])
  return terms(sf, tf), jax.jacrev(terms, argnums=(0, 1))(sf, tf)


def ours_values_and_grads(sf, sp, tf, tp, labels, dtype, **kw):
  vals, (gs, gt) = _values_and_jacobians(*(jnp.asarray(x, dtype) for x in (sf, sp, tf, tp)),
                                         labels, **kw)
  return (dict(zip(KEYS, np.asarray(vals))),
          {k: (np.asarray(gs[i]), np.asarray(gt[i])) for i, k in enumerate(KEYS)})


def torch_values_and_grads(sf, sp, tf, tp, labels, **kw):
  sft = torch.tensor(sf, dtype=torch.float64, requires_grad=True)
  tft = torch.tensor(tf, dtype=torch.float64, requires_grad=True)
  lab = None if labels is None else torch.from_numpy(labels)
  out, _ = ref.feature_regularization(sft, torch.tensor(sp, dtype=torch.float64), tft,
                                      torch.tensor(tp, dtype=torch.float64), source_labels=lab,
                                      **kw)
  vals, grads = {}, {}
  for k in KEYS:
    vals[k] = out[k].item()
    if out[k].requires_grad:
      g = torch.autograd.grad(out[k], [sft, tft], retain_graph=True, allow_unused=True)
      grads[k] = tuple(np.zeros(x.shape) if gi is None else gi.numpy()
                       for gi, x in zip(g, (sf, tf)))
    else:
      grads[k] = (np.zeros(sf.shape), np.zeros(tf.shape))
  return vals, grads


def assert_matches(ours, theirs, tol):
  (ov, og), (tv, tg) = ours, theirs
  for k in KEYS:
    assert np.isfinite(ov[k]), k
    assert rel_err(ov[k], tv[k]) <= tol, (k, ov[k], tv[k])
    for side in range(2):
      assert np.all(np.isfinite(og[k][side])), k
      assert rel_err(og[k][side], tg[k][side]) <= tol, (k, side, rel_err(og[k][side], tg[k][side]))


@pytest.mark.parametrize("use_labels,p,x64", [
    (False, 1, False), (True, 1, False), (False, 2, False), (True, 2, False),  # float32: 1e-5
    (True, 1, True), (False, 2, True)])  # float64 on both sides: 1e-10
def test_matches_transcription(use_labels, p, x64):
  sf, sp, tf, tp, labels = make_inputs(seed=10 * p + use_labels)
  labels = labels if use_labels else None
  kw = dict(num_classes=6, cluster_norm_order=p, ortho_temperature=1.7, sparsity_rho=0.4)
  theirs = torch_values_and_grads(sf, sp, tf, tp, labels, **kw)
  if x64:
    with jax.enable_x64(True):
      ours = ours_values_and_grads(sf, sp, tf, tp, labels, jnp.float64, **kw)
    assert_matches(ours, theirs, 1e-10)
  else:
    ours = ours_values_and_grads(sf, sp, tf, tp, labels, jnp.float32, **kw)
    assert_matches(ours, theirs, 1e-5)


def test_transcription_check_sees_absent_classes():
  """The random inputs really have absent classes in each role (else the test proves less)."""
  sf, sp, tf, tp, labels = make_inputs(seed=10)
  assert set(np.unique(ref.assign_bilinear(torch.tensor(tp), tf.shape[1:3]).numpy())) == {0, 1, 2}
  source_classes = np.unique(ref.assign_bilinear(torch.tensor(sp), sf.shape[1:3]).numpy())
  assert set(source_classes) == {0, 1, 2, 3}
  assert set(np.unique(labels)) == {0, 2, 3, 255}


@functools.partial(jax.jit, static_argnums=5)
def _smoothed_total_and_grad(sf, sp, tf, tp, state, alpha):
  def total(a):
    out = losses.feature_regularization(a, sp, tf, tp, centroid_state=state, num_classes=6,
                                        cluster_norm_order=2, centroid_smoothing=alpha)
    return sum(out[k] for k in KEYS), out
  return jax.value_and_grad(total, has_aux=True)(sf)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_smoothing_matches_transcription_over_steps(alpha):
  kw = dict(num_classes=6, cluster_norm_order=2, centroid_smoothing=alpha)
  state_t, state_j = None, losses.init_centroid_state(6, 8)
  for step, seed in enumerate([1, 2, 3]):
    sf, sp, tf, tp, _ = make_inputs(seed=seed)
    if step == 1:  # a class present at step 0 and absent now keeps its centroid
      sp = np.concatenate([sp[..., :2] * 0, sp[..., 2:]], -1)
      sp[..., 2] += 1.0
    sft = torch.tensor(sf, dtype=torch.float64, requires_grad=True)
    out_t, state_t = ref.feature_regularization(sft, torch.tensor(sp, dtype=torch.float64),
                                                torch.tensor(tf, dtype=torch.float64),
                                                torch.tensor(tp, dtype=torch.float64),
                                                state=state_t, **kw)
    total_t = sum(out_t[k] for k in KEYS)
    (g_t,) = torch.autograd.grad(total_t, [sft])

    (tot, out_j), g_j = _smoothed_total_and_grad(sf, sp, tf, tp, state_j, alpha)
    for k in KEYS:
      assert rel_err(out_j[k], out_t[k].item()) <= 1e-5, (step, k)
    assert rel_err(g_j, g_t.numpy()) <= 1e-5
    state_j = out_j["centroid_state"]
    expected_state = np.stack([np.zeros(8) if c is None else c.numpy() for c in state_t])
    np.testing.assert_array_equal(np.asarray(state_j.seen), [c is not None for c in state_t])
    assert rel_err(state_j.centroids, expected_state) <= 1e-5


def test_cross_entropy_and_iw_match_transcription():
  rng = np.random.default_rng(3)
  logits = (3 * rng.normal(size=(2, 9, 11, 5))).astype(np.float32)
  labels = rng.choice(np.array([0, 1, 3, 255], np.int32), size=(2, 9, 11))
  lt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  ce_t = ref.cross_entropy(lt, torch.from_numpy(labels))
  (g_t,) = torch.autograd.grad(ce_t, [lt])
  ce, g = jax.value_and_grad(losses.cross_entropy)(jnp.asarray(logits), labels)
  assert rel_err(ce, ce_t.item()) <= 1e-6
  assert rel_err(g, g_t.numpy()) <= 1e-5

  prob = softmax(logits).astype(np.float32)
  for ratio in (0.0, 0.2):
    pt = torch.tensor(prob, dtype=torch.float64, requires_grad=True)
    iw_t = ref.iw_max_square_loss(pt, ratio)
    (g_t,) = torch.autograd.grad(iw_t, [pt])
    iw, g = jax.value_and_grad(losses.iw_max_square_loss)(jnp.asarray(prob), ratio)
    assert rel_err(iw, iw_t.item()) <= 1e-6
    assert rel_err(g, g_t.numpy()) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Centroid smoothing rule.


def test_centroid_smoothing_update_rule():
  alpha = 0.25
  prev = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], np.float32)
  state = losses.CentroidState(centroids=jnp.asarray(prev), seen=jnp.array([True, True, False]))
  # Current step: class 0 at (5, 6) (seen before), class 2 at (7, 9) (first time), class 1 absent.
  sf = np.array([[[[5.0, 6.0], [7.0, 9.0]]]], np.float32)
  sp = one_hot_probs([[[0, 2]]], 3)
  tf = np.array([[[[7.0, 9.0]]]], np.float32)
  tp = one_hot_probs([[[2]]], 3)
  out = fr(sf, sp, tf, tp, num_classes=3, centroid_smoothing=alpha, centroid_state=state)
  # Bilinear and nearest passes see the same assignments here, so the state is updated twice:
  c0_once = alpha * np.array([5.0, 6.0]) + (1 - alpha) * prev[0]
  c0_twice = alpha * np.array([5.0, 6.0]) + (1 - alpha) * c0_once
  new = out["centroid_state"]
  np.testing.assert_allclose(new.centroids[0], c0_twice, rtol=1e-6)
  np.testing.assert_allclose(new.centroids[1], prev[1])  # absent: keeps the previous centroid
  np.testing.assert_allclose(new.centroids[2], [7.0, 9.0], rtol=1e-6)  # first seen: current
  np.testing.assert_array_equal(new.seen, [True, True, True])
  # The absent-but-seen class 1 counts as present for c_dist (3 centroids) after smoothing.
  c = np.stack([c0_once, prev[1], [7.0, 9.0]])
  expected = np.mean([np.abs(c[i] - np.delete(c, i, 0)).sum() / 4 for i in range(3)])
  np.testing.assert_allclose(out["c_dist"], expected, rtol=1e-6)
  # Without a previous state the first update uses the current centroids.
  fresh = fr(sf, sp, tf, tp, num_classes=3, centroid_smoothing=alpha)
  np.testing.assert_array_equal(fresh["centroid_state"].seen, [True, False, True])
  np.testing.assert_allclose(fresh["centroid_state"].centroids[0], [5.0, 6.0], rtol=1e-6)
  # The state carries no gradient, and smoothing off leaves a given state untouched.
  off = fr(sf, sp, tf, tp, num_classes=3, centroid_state=state)
  np.testing.assert_array_equal(off["centroid_state"].centroids, prev)
  assert "centroid_state" not in fr(sf, sp, tf, tp, num_classes=3)
  with pytest.raises(ValueError):
    fr(sf, sp, tf, tp, num_classes=3, centroid_smoothing=1.5)


def test_centroid_state_is_a_stable_pytree_under_jit():
  state = losses.init_centroid_state(6, 8)
  assert state.centroids.shape == (6, 8) and state.centroids.dtype == jnp.float32
  assert state.seen.shape == (6,) and state.seen.dtype == jnp.bool_
  sf, sp, tf, tp, _ = make_inputs(seed=4)

  @jax.jit
  def step(state, sf):
    def total(sf):
      out = losses.feature_regularization(sf, sp, tf, tp, num_classes=6, centroid_smoothing=0.5,
                                          centroid_state=state)
      return out["f_dist_source"] + out["ortho_loss"], out["centroid_state"]
    return jax.grad(total, has_aux=True)(sf)

  g, new = step(state, sf)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert all(a.shape == b.shape and a.dtype == b.dtype
             for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)))
  g2, _ = step(new, sf)  # same structure: no recompilation needed, and finite
  assert np.all(np.isfinite(g)) and np.all(np.isfinite(g2))
  assert step._cache_size() == 1


# ------------------------------------------------------------------------------------------------
# Degenerate inputs and finiteness.


def _all_grads(sf, sp, tf, tp, source_labels=None, **kw):
  vals, grads = ours_values_and_grads(sf, sp, tf, tp, source_labels, jnp.float32,
                                      ortho_temperature=1.7, sparsity_rho=0.4, **kw)
  return (vals, np.stack([grads[k][0] for k in KEYS]), np.stack([grads[k][1] for k in KEYS]))


@pytest.mark.parametrize("p", [1, 2])
def test_single_present_class_is_finite(p):
  sf, sp, tf, tp, _ = make_inputs(seed=5)
  sp = one_hot_probs(np.zeros(sp.shape[:3], int), 6)
  tp = one_hot_probs(np.zeros(tp.shape[:3], int), 6)
  vals, gs, gt = _all_grads(sf, sp, tf, tp, num_classes=6, cluster_norm_order=p)
  assert vals["c_dist"] == 0.0
  assert vals["ortho_loss"] == 0.0  # one class: p = 1 everywhere
  assert all(np.isfinite(v) for v in vals.values())
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))


@pytest.mark.parametrize("p", [1, 2])
def test_domain_without_assigned_features_is_finite(p):
  sf, sp, tf, tp, labels = make_inputs(seed=6)
  ignored = np.full_like(labels, 255)
  vals, gs, gt = _all_grads(sf, sp, tf, tp, num_classes=6, cluster_norm_order=p,
                            source_labels=ignored)
  assert vals["f_dist_source"] == 0.0
  assert vals["f_dist_target"] > 0 and vals["c_dist"] > 0
  assert all(np.isfinite(v) for v in vals.values())
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  # Source features still take part in the orthogonality term (all positions), not in clustering.
  assert np.all(gs[:3] == 0) and np.any(gs[3] != 0)


def test_zero_distances_norm2_gradients_are_finite_and_match_torch():
  # Class 1 has a single feature, class 2 only identical features (with a zero channel), and a
  # row of source features is zero: many exactly-zero distances, where sqrt'(0) gives NaN.
  sf, sp, tf, tp, _ = make_inputs(seed=7, batch=1)
  sp = one_hot_probs(np.zeros(sp.shape[:3], int), 6)
  sp[0, 0, 0] = one_hot_probs(1, 6)  # nearest and bilinear both keep pixel (0, 0)
  tp = one_hot_probs(np.full(tp.shape[:3], 2), 6)
  tf = np.round(np.broadcast_to(tf[:, :1, :1], tf.shape) * 8) / 8  # exact mean of copies
  tf[..., 3] = 0.0
  sf[0, 1] = 0.0  # zero features of class 0 (class 1's single feature stays nonzero)
  kw = dict(num_classes=6, cluster_norm_order=2)
  ours = ours_values_and_grads(sf, sp, tf, tp, None, jnp.float32, **kw)
  theirs = torch_values_and_grads(sf, sp, tf, tp, None, **kw)
  assert ours[0]["f_dist_target"] == 0.0
  assert_matches(ours, theirs, 1e-5)


def test_all_zero_features_are_finite():
  sf, sp, tf, tp, _ = make_inputs(seed=8)
  sf, tf = np.zeros_like(sf), np.zeros_like(tf)
  for p in (1, 2):
    vals, gs, gt = _all_grads(sf, sp, tf, tp, num_classes=6, cluster_norm_order=p)
    assert all(np.isfinite(v) for v in vals.values()), vals
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))


# ------------------------------------------------------------------------------------------------
# Properties (hypothesis): finite, invariant to the order of the images in the batch.

_SHAPES = [  # (batch, src_feat_hw, src_hw, tgt_feat_hw, tgt_hw); few shapes: few compilations
    (3, (3, 4), (9, 13), (2, 3), (7, 9)),
]


@functools.lru_cache(maxsize=None)
def _jitted_all(p, use_labels):
  def all_terms(sf, sl, tf, tl, labels):
    sp, tp = jax.nn.softmax(sl), jax.nn.softmax(tl)

    def total(sf, tf):
      out = losses.feature_regularization(sf, sp, tf, tp, num_classes=4, cluster_norm_order=p,
                                          source_labels=labels if use_labels else None)
      return sum(out[k] for k in KEYS), jnp.stack([out[k] for k in KEYS])

    (_, vals), (gs, gt) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(sf, tf)
    iw = jax.value_and_grad(losses.iw_max_square_loss)(tp, 0.2)
    ce = jax.value_and_grad(losses.cross_entropy)(sl, labels)
    return vals, gs, gt, iw, ce
  return jax.jit(all_terms)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), shape=st.sampled_from(_SHAPES), p=st.sampled_from([1, 2]),
       use_labels=st.booleans(), scale=st.sampled_from([0.0, 1e-3, 1.0, 50.0]),
       peaked=st.booleans())
def test_property_finite_and_batch_permutation_invariant(seed, shape, p, use_labels, scale, peaked):
  batch, sfhw, shw, tfhw, thw = shape
  rng = np.random.default_rng(seed)
  c = 4
  logit_scale = 20.0 if peaked else 1.0
  sp = (logit_scale * rng.normal(size=(batch,) + shw + (c,))).astype(np.float32)  # logits
  tp = (logit_scale * rng.normal(size=(batch,) + thw + (c,))).astype(np.float32)
  sf = (scale * np.maximum(rng.normal(size=(batch,) + sfhw + (5,)), 0)).astype(np.float32)
  tf = (scale * np.maximum(rng.normal(size=(batch,) + tfhw + (5,)), 0)).astype(np.float32)
  labels = rng.choice(np.array([0, 1, 3, 255], np.int32), size=(batch,) + shw)
  fn = _jitted_all(p, use_labels)
  vals, gs, gt, iw, ce = fn(sf, sp, tf, tp, labels)
  leaves = jax.tree.leaves((vals, gs, gt, iw, ce))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  ps, pt = rng.permutation(batch), rng.permutation(batch)
  vals2, gs2, gt2, iw2, ce2 = fn(sf[ps], sp[ps], tf[pt], tp[pt], labels[ps])
  np.testing.assert_allclose(vals2, vals, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(gs2, np.asarray(gs)[ps], rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(gt2, np.asarray(gt)[pt], rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(iw2[0], iw[0], rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(iw2[1], np.asarray(iw[1])[pt], rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(ce2[0], ce[0], rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(ce2[1], np.asarray(ce[1])[ps], rtol=2e-5, atol=1e-7)
