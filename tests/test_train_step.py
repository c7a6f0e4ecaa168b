"""The pmapped UDA train step: 4 devices x 1 image == 1 device x 4 images (sync BN)."""

import flax
import jax
import numpy as np
import pytest

from udajax import configuration
from udajax import train_step as ts


def tiny_config(mode="uda"):
  c = configuration.base_config()
  c.model.stage_blocks = (1, 1, 1, 1)
  c.model.base_width = 4
  c.model.sync_bn = True
  c.train.mode = mode
  c.train.lr = 1e-2
  c.train.num_steps = 10
  c.loss.centroid_smoothing = 0.5
  return c


def make_batch(n, rng, mode="uda"):
  batch = {
      "source_image": rng.normal(0, 40, size=(n, 33, 49, 3)).astype(np.float32),
      "source_label": rng.integers(0, 21, size=(n, 33, 49)).astype(np.int32),  # 19, 20 -> ignored
  }
  if mode == "uda":
    batch["target_image"] = rng.normal(0, 40, size=(n, 25, 41, 3)).astype(np.float32)
  return batch


def rel_err(a, b):
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def test_pmap_step_equals_single_device_on_global_batch(mode="uda"):
  assert jax.local_device_count() >= 4
  config = tiny_config(mode)
  # Source classes from labels: with "predictions", a pixel at a near-tie of the source argmax
  # can flip between the two runs at step 2 (float32 summation order), a discrete change that
  # says nothing about the multi-device code (measured: 1e-6 at step 1, 3e-5 after a flip).
  config.loss.source_assignment = "labels"
  variables = ts.init_variables(config, jax.random.PRNGKey(0))
  # Decisive logits: class assignments are argmaxes, and a near-tie could flip under the
  # ~1e-7 float differences between a psum over 4 devices and one sum over 4 images.
  variables = flax.core.unfreeze(variables)
  variables["params"]["classifier"] = jax.tree_util.tree_map(lambda x: 30.0 * x,
                                                             variables["params"]["classifier"])
  state = ts.create_train_state(config, variables, jax.random.PRNGKey(1))
  batch = make_batch(4, np.random.default_rng(0), mode)

  step4 = ts.make_p_train_step(config, devices=jax.devices()[:4], donate=False)
  step1 = ts.make_p_train_step(config, devices=jax.devices()[:1], donate=False)
  s4, s1 = flax.jax_utils.replicate(state, jax.devices()[:4]), flax.jax_utils.replicate(state, jax.devices()[:1])
  for _ in range(2):  # two steps: momentum and the BN/centroid state carried over are compared too
    s4, m4 = step4(s4, jax.tree_util.tree_map(lambda x: x.reshape((4, 1) + x.shape[1:]), batch))
    s1, m1 = step1(s1, jax.tree_util.tree_map(lambda x: x[None], batch))
  for k in m1:
    np.testing.assert_allclose(np.asarray(m4[k])[0], np.asarray(m1[k])[0], rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(m1["finite"][0]) == 1.0
  if mode == "uda":
    assert {"ce", "em", "clustering", "orthogonality", "sparsity", "total"} <= set(m1)
  flat4 = flax.traverse_util.flatten_dict(jax.device_get(ts.unreplicate(s4.params)))
  flat1 = flax.traverse_util.flatten_dict(jax.device_get(ts.unreplicate(s1.params)))
  init = flax.traverse_util.flatten_dict(jax.device_get(state.params))
  # Updated params as a whole: max|4 devices - 1 device| / max|1 device| <= 1e-5.
  diff = max(np.max(np.abs(flat4[k] - flat1[k])) for k in flat1)
  scale = max(np.max(np.abs(flat1[k])) for k in flat1)
  assert diff / scale <= 1e-5, diff / scale
  # And the updates themselves agree leaf by leaf (so the check above is not vacuous): the
  # residual ~1e-5 comes from float32 summation order inside train-mode (synchronised) BN.
  for k in flat1:
    upd1, upd4 = flat1[k] - init[k], flat4[k] - init[k]
    if np.any(upd1 != 0):
      assert rel_err(upd4, upd1) <= 1e-3, k
  # All 4 replicas stay identical.
  for leaf in jax.tree_util.tree_leaves(s4.params):
    np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[3])


def test_frozen_stem_bn_and_zero_lambda_removes_term():
  config = tiny_config("uda")
  config.loss.lambda_or = 0.0
  state = ts.create_train_state(config, ts.init_variables(config, jax.random.PRNGKey(0)),
                                jax.random.PRNGKey(1))
  step1 = ts.make_p_train_step(config, devices=jax.devices()[:1], donate=False)
  new, m = step1(flax.jax_utils.replicate(state, jax.devices()[:1]),
                 jax.tree_util.tree_map(lambda x: x[None], make_batch(2, np.random.default_rng(1))))
  assert "orthogonality" not in m and "sparsity" in m
  new = ts.unreplicate(new)
  np.testing.assert_array_equal(new.params["backbone"]["bn1"]["scale"], state.params["backbone"]["bn1"]["scale"])
  assert not np.allclose(new.params["classifier"]["conv_0"]["kernel"] if "conv_0" in new.params["classifier"]
                         else jax.tree_util.tree_leaves(new.params["classifier"])[0],
                         state.params["classifier"]["conv_0"]["kernel"] if "conv_0" in state.params["classifier"]
                         else jax.tree_util.tree_leaves(state.params["classifier"])[0])
  # BN running stats moved (train-mode forward of both domains).
  assert not np.allclose(jax.tree_util.tree_leaves(new.batch_stats)[0], jax.tree_util.tree_leaves(state.batch_stats)[0])


def test_nan_step_is_not_applied():
  config = tiny_config("source_only")
  state = ts.create_train_state(config, ts.init_variables(config, jax.random.PRNGKey(0)),
                                jax.random.PRNGKey(1))
  batch = make_batch(1, np.random.default_rng(2), "source_only")
  batch["source_image"][0, 0, 0, 0] = np.nan
  step1 = ts.make_p_train_step(config, devices=jax.devices()[:1], donate=False)
  new, m = step1(flax.jax_utils.replicate(state, jax.devices()[:1]), jax.tree_util.tree_map(lambda x: x[None], batch))
  assert float(m["finite"][0]) == 0.0 and not np.isfinite(float(m["ce"][0]))
  new = ts.unreplicate(new)
  assert int(new.step) == 1
  # The poly schedule's counters advance with the step (the lr stays a function of the step).
  counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(new.opt_state)
            if "count" in jax.tree_util.keystr(path)]
  assert counts and all(int(c) == 1 for c in counts)
  for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(a, b)
