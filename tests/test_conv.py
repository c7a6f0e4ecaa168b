"""udajax.conv (the model's convolution layer) and the block-output ReLU against the plain ops.

`pointwise_conv` has a hand-written backward pass: its values and both gradients are checked
against `lax.conv_general_dilated` differentiated by JAX. `Conv` must have `nn.Conv`'s parameters
(names, shapes, initial values) and results. The last test guards the CPU speed fix: the
compiled backward pass must read each block output instead of recomputing the stage's chain.
"""

import re

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from udajax import models
from udajax.conv import Conv, pointwise_conv

_DN = ("NHWC", "HWIO", "NHWC")


def relerr(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _vjp_all(f, x, w, g):
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(g)


@pytest.mark.parametrize("shape,stride", [((2, 9, 14, 6), 1), ((2, 9, 14, 6), 2),
                                          ((1, 10, 7, 5), 3), ((1, 65, 129, 16), 2)])
def test_pointwise_conv_values_and_gradients_match_lax_conv(shape, stride):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, shape[-1], 7)), jnp.float32)
  conv = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=_DN)
  y_ref = conv(x, w)
  g = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
  ours = jax.jit(lambda x, w, g: _vjp_all(lambda x, w: pointwise_conv(x, w, stride), x, w, g))(
      x, w, g)
  theirs = jax.jit(lambda x, w, g: _vjp_all(conv, x, w, g))(x, w, g)
  for name, a, b in zip(("y", "dx", "dkernel"), ours, theirs):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert relerr(a, b) < 1e-5, (name, relerr(a, b))
  # The input gradient is exactly zero off the strided positions.
  if stride > 1:
    mask = np.ones(shape, bool)
    mask[:, ::stride, ::stride] = False
    assert np.all(np.asarray(ours[1])[mask] == 0)


def test_pointwise_conv_bfloat16_keeps_dtypes():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 12, 10, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 8, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(1, 6, 5, 4)), jnp.float32)
  y, dx, dw = _vjp_all(lambda x, w: pointwise_conv(x, w, 2), x.astype(jnp.bfloat16),
                       w.astype(jnp.bfloat16), g.astype(jnp.bfloat16))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
  y32, dx32, dw32 = _vjp_all(lambda x, w: pointwise_conv(x, w, 2), x, w, g)
  # bf16 keeps 8 significant bits: 2^-8 relative per rounding, a few roundings per result.
  for a, b in ((y, y32), (dx, dx32), (dw, dw32)):
    assert relerr(a, b) < 3e-2


@pytest.mark.parametrize("kwargs", [
    dict(features=5, kernel_size=1, stride=2),
    dict(features=5, kernel_size=1, use_bias=True),
    dict(features=4, kernel_size=3, padding=2, dilation=2, use_bias=True),
    dict(features=3, kernel_size=7, stride=2, padding=3),
    dict(features=5, kernel_size=1, stride=2, dtype=jnp.bfloat16),
    dict(features=4, kernel_size=3, padding=1, use_bias=True, dtype=jnp.bfloat16),
])
def test_conv_module_has_nn_conv_parameters_and_results(kwargs):
  k, s, p, d = (kwargs["kernel_size"], kwargs.get("stride", 1), kwargs.get("padding", 0),
                kwargs.get("dilation", 1))
  ours = Conv(**kwargs, kernel_init=nn.initializers.normal(0.1),
              bias_init=nn.initializers.normal(0.1))
  theirs = nn.Conv(kwargs["features"], (k, k), strides=(s, s), padding=((p, p), (p, p)),
                   kernel_dilation=(d, d), use_bias=kwargs.get("use_bias", False),
                   dtype=kwargs.get("dtype"), param_dtype=jnp.float32,
                   kernel_init=nn.initializers.normal(0.1), bias_init=nn.initializers.normal(0.1))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 11, 13, 6)), jnp.float32)
  v_ours, v_theirs = ours.init(jax.random.PRNGKey(3), x), theirs.init(jax.random.PRNGKey(3), x)
  assert jax.tree_util.tree_structure(v_ours) == jax.tree_util.tree_structure(v_theirs)
  for a, b in zip(jax.tree_util.tree_leaves(v_ours), jax.tree_util.tree_leaves(v_theirs)):
    np.testing.assert_array_equal(a, b)  # same names, shapes and initial values
  loss = lambda mdl: lambda v, x: jnp.sum(jnp.sin(mdl.apply(v, x)))  # noqa: E731
  (l1, g1), (l2, g2) = (jax.value_and_grad(loss(m), argnums=(0, 1))(v_ours, x)
                        for m in (ours, theirs))
  # float32: summation order only. bfloat16 (both compute in it): a few roundings of 2^-8.
  tol = 1e-5 if kwargs.get("dtype") is None else 3e-2
  assert abs(float(l1) - float(l2)) <= tol * abs(float(l2)) + tol
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    assert a.dtype == b.dtype and relerr(a, b) < tol


def test_residual_relu_is_relu_with_nan_kept():
  v = jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.5, jnp.nan, -jnp.inf, jnp.inf])
  out = models.residual_relu(v)
  np.testing.assert_array_equal(out, nn.relu(v))  # NaN stays NaN, as max(v, 0) and torch
  assert np.isnan(np.asarray(out)[5])
  finite = v[jnp.isfinite(v)]
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(models.residual_relu(v) * 3.0))(finite),
                                jax.grad(lambda v: jnp.sum(nn.relu(v) * 3.0))(finite))
  # At NaN the gradient passes (as torch's threshold_backward), so a NaN stays visible.
  assert float(jax.grad(lambda v: models.residual_relu(v) * 3.0)(jnp.nan)) == 3.0


def _largest_fusion_operand_count(stage_blocks):
  """Most operands of any fused kernel in the compiled train-mode gradient of a tiny ResNet."""
  model = models.DeepLabV2(num_classes=3, stage_blocks=stage_blocks, base_width=4)
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  # Only the variables' shapes matter for the compiled program: traced, not initialised.
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))

  def loss(params, batch_stats):
    (logits, feats), _ = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
    return jnp.sum(logits) + jnp.sum(feats)

  hlo = jax.jit(jax.grad(loss)).lower(variables["params"],
                                      variables["batch_stats"]).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  counts = [m.count("%") for m in re.findall(r" fusion\(([^)]*)\)", entry)]
  return max(counts)


def test_backward_reads_block_outputs_instead_of_recomputing_the_stage():
  # With the stage's chain recomputed in each block's backward (XLA CPU, `nn.relu` at the block
  # output) the largest fused kernel grew by 5 operands per block: 3 -> 12 layer3 blocks went
  # 22 -> 67. Reading each block output from memory keeps it independent of the depth (16 -> 16).
  shallow = _largest_fusion_operand_count((1, 1, 3, 1))
  deep = _largest_fusion_operand_count((1, 1, 12, 1))
  assert deep <= shallow + 4, (shallow, deep)
