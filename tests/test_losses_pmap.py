"""udajax.losses under jax.pmap: 4 CPU devices x 1 image == 1 device x 4 images.

Values and gradients w.r.t. each device's local inputs must equal the single-device ones (the
gradient slice of that device's images), with no factor of the device count; a model's
parameter gradient is then the psum of the per-device parameter gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_losses import KEYS, make_inputs, one_hot_probs, rel_err
from udajax import losses

N = 4
AX = "devices"
TOL = 1e-5

pytestmark = pytest.mark.skipif(jax.local_device_count() < N,
                                reason="needs 4 devices (tests/conftest.py forces 4 CPU devices)")


def _per_device(x):
  """(N * 1, ...) -> (N, 1, ...): one image per device."""
  return None if x is None else x.reshape((N, 1) + x.shape[1:])


def test_plain_psum_gradient_is_scaled_by_device_count():
  """The premise documented in udajax.losses: jax 0.10.2 pmap transposes psum to psum."""
  x = jnp.arange(1.0, N + 1.0).reshape(N, 1)
  plain = jax.pmap(jax.grad(lambda v: jax.lax.psum(jnp.sum(v ** 2), AX)), axis_name=AX)(x)
  ours = jax.pmap(jax.grad(lambda v: losses.global_sum(jnp.sum(v ** 2), AX)), axis_name=AX)(x)
  np.testing.assert_allclose(plain, N * 2 * x)
  np.testing.assert_allclose(ours, 2 * x)


def _inputs():
  sf, sp, tf, tp, labels = make_inputs(seed=21, batch=N)
  sp[1] = one_hot_probs(np.full(sp.shape[1:3], 2), 6)  # device 1: a single source class
  tp[2, ..., 1:] *= 1e-3  # device 2: target almost all class 0
  tp[2] /= tp[2].sum(-1, keepdims=True)
  labels[3] = 255  # device 3: no labelled source pixel
  return sf, sp, tf, tp, labels


@pytest.mark.parametrize("use_labels,p,smoothing", [(False, 1, None), (True, 2, None),
                                                    (False, 2, 0.6)])
def test_feature_regularization_pmap_matches_single_device(use_labels, p, smoothing):
  sf, sp, tf, tp, labels = _inputs()
  labels = labels if use_labels else None
  kw = dict(num_classes=6, cluster_norm_order=p, ortho_temperature=1.3,
            centroid_smoothing=smoothing)
  state = None
  if smoothing is not None:  # a previous state where class 5 (absent now) was seen
    state = losses.CentroidState(
        centroids=jnp.asarray(np.random.default_rng(0).uniform(size=(6, 8)), jnp.float32),
        seen=jnp.array([True, False, False, True, False, True]))

  def terms(sf, tf, sp, tp, labels, state, axis_name):
    out = losses.feature_regularization(sf, sp, tf, tp, source_labels=labels, axis_name=axis_name,
                                        centroid_state=state, **kw)
    return jnp.stack([out[k] for k in KEYS]), out.get("centroid_state")

  def values_and_jacobians(sf, tf, sp, tp, labels, state, axis_name=None):
    f = functools.partial(terms, sp=sp, tp=tp, labels=labels, state=state, axis_name=axis_name)
    vals, new_state = f(sf, tf)
    jac = jax.jacrev(lambda a, b: f(a, b)[0], argnums=(0, 1))(sf, tf)
    return vals, jac, new_state

  single = jax.jit(values_and_jacobians)(sf, tf, sp, tp, labels, state)
  replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (N,) + x.shape), state)
  multi = jax.pmap(functools.partial(values_and_jacobians, axis_name=AX), axis_name=AX)(
      *map(_per_device, (sf, tf, sp, tp, labels)), replicated)
  (v1, (gs1, gt1), st1), (vn, (gsn, gtn), stn) = single, multi
  for d in range(N):
    assert rel_err(vn[d], v1) <= TOL, (d, vn[d], v1)
    for i, k in enumerate(KEYS):
      assert np.all(np.isfinite(gsn[d][i])) and np.all(np.isfinite(gtn[d][i]))
      assert rel_err(gsn[d][i][0], gs1[i][d]) <= TOL, (k, d, "source")
      assert rel_err(gtn[d][i][0], gt1[i][d]) <= TOL, (k, d, "target")
  assert np.max(np.abs(np.asarray(gs1))) > 0  # the check is not vacuous
  if smoothing is not None:
    for d in range(N):
      assert rel_err(stn.centroids[d], st1.centroids) <= TOL
      np.testing.assert_array_equal(stn.seen[d], st1.seen)


def test_cross_entropy_and_iw_pmap_match_single_device():
  rng = np.random.default_rng(5)
  logits = (2 * rng.normal(size=(N, 9, 11, 5))).astype(np.float32)
  labels = rng.choice(np.array([0, 1, 4, 255], np.int32), size=(N, 9, 11))
  labels[2] = 255  # a device without any labelled pixel
  prob = np.asarray(jax.nn.softmax(logits))

  def both(logits, labels, prob, axis_name=None):
    ce = jax.value_and_grad(functools.partial(losses.cross_entropy, axis_name=axis_name))(
        logits, labels)
    iw = jax.value_and_grad(lambda q: losses.iw_max_square_loss(q, 0.2, axis_name=axis_name))(prob)
    return ce, iw

  (ce1, gce1), (iw1, giw1) = jax.jit(both)(logits, labels, prob)
  (cen, gcen), (iwn, giwn) = jax.pmap(functools.partial(both, axis_name=AX), axis_name=AX)(
      *map(_per_device, (logits, labels, prob)))
  for d in range(N):
    assert rel_err(cen[d], ce1) <= TOL and rel_err(iwn[d], iw1) <= TOL
    assert rel_err(gcen[d][0], gce1[d]) <= TOL
    assert rel_err(giwn[d][0], giw1[d]) <= TOL


def test_parameter_gradients_psum_to_single_device_gradient():
  """What the trainer does: per-device parameter gradients, psum'd, equal the 1-device gradient."""
  xs, _, xt, _, labels = _inputs()  # stand-ins for source / target images at feature resolution
  rng = np.random.default_rng(9)
  params = {"w": jnp.asarray(rng.normal(size=(8, 8)) * 0.3, jnp.float32),
            "head": jnp.asarray(rng.normal(size=(8, 6)) * 0.3, jnp.float32)}

  def loss(params, xs, xt, labels, axis_name=None):
    fs, ft = jax.nn.relu(xs @ params["w"]), jax.nn.relu(xt @ params["w"])  # (B, h, w, F)
    ls, lt = fs @ params["head"], ft @ params["head"]  # logits at feature resolution
    ps, pt = jax.nn.softmax(ls), jax.nn.softmax(lt)
    lab = labels[:, ::3, ::3][:, :fs.shape[1], :fs.shape[2]]
    out = losses.feature_regularization(fs, ps, ft, pt, num_classes=6, cluster_norm_order=2,
                                        axis_name=axis_name)
    return (losses.cross_entropy(ls, lab, axis_name=axis_name)
            + 0.1 * losses.iw_max_square_loss(pt, 0.2, axis_name=axis_name)
            + 0.02 * (out["f_dist_source"] + out["f_dist_target"] - out["c_dist"])
            + 2.0 * out["ortho_loss"] + 0.5 * out["sparse_loss"])

  g1 = jax.jit(jax.grad(loss))(params, xs, xt, labels)

  def per_device(params, xs, xt, labels):
    g = jax.grad(loss)(params, xs, xt, labels, axis_name=AX)
    return jax.lax.psum(g, AX)  # psum, not pmean: each device holds its share of the gradient

  replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (N,) + x.shape), params)
  gn = jax.pmap(per_device, axis_name=AX)(replicated, *map(_per_device, (xs, xt, labels)))
  for k in params:
    assert np.max(np.abs(np.asarray(g1[k]))) > 0
    for d in range(N):
      assert rel_err(gn[k][d], g1[k]) <= TOL, (k, d, rel_err(gn[k][d], g1[k]))
