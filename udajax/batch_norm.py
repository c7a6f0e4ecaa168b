"""PyTorch-exact BatchNorm for the DeepLab-v2 model: the module and its train-mode function.

`BatchNorm` matches `torch.nn.BatchNorm2d` (eps 1e-5, running averages r ← 0.9·r + 0.1·s,
two-pass batch variance, running variance updated with the unbiased batch variance; statistics
in float32), optionally synchronised over a pmap axis. Train mode is `batch_norm_train`, a
`custom_vjp` with the closed-form backward pass. Imports only jax/flax/numpy.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class BatchNorm(nn.Module):
  """PyTorch-exact BatchNorm over all axes but the last (channels).

  Train mode normalises with the biased two-pass batch variance and (outside init) updates
  `batch_stats/mean` and `batch_stats/var` as PyTorch does: r ← 0.9·r + 0.1·s with s the batch
  mean resp. the *unbiased* batch variance. With `axis_name` set (inside pmap) the statistics
  are those of the global batch (all devices; equal per-device batch sizes), i.e. SyncBatchNorm.
  Params and statistics are float32; the output has dtype `dtype`. Train mode is
  `batch_norm_train` (closed-form backward pass).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    """x: (B, H, W, C) → (B, H, W, C)."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      sync = self.axis_name is not None and not self.is_initializing()
      axis_name = self.axis_name if sync else None
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, axis_name)
      if not self.is_initializing():
        n = int(np.prod(x.shape[:-1]))
        if sync:
          n = n * jax.lax.psum(1, self.axis_name)
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)
      return y.astype(self.dtype)
    mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
    y = (x.astype(jnp.float32) - ra_mean.value) * mul + bias
    return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name: Optional[str]):
  """Train-mode BatchNorm over all axes but the last: x (B, H, W, C) → (y, mean, var).

  y = (x − mean)·rsqrt(var + ε)·scale + bias in float32, mean and the biased two-pass variance
  var over the batch (the global batch of all devices when `axis_name` is set). The backward
  pass is the closed form of that derivative (with x̂ = (x − mean)·rsqrt(var + ε), N elements
  per channel, sums over the global batch):

    dx = scale·rsqrt(var + ε)·(g − Σg/N − x̂·Σ(g·x̂)/N) + g_mean/N + g_var·2(x − mean)/N,
    dscale = Σ(g·x̂), dbias = Σg (this device's part; the trainer sums parameter gradients),

  which keeps only `x` (in its own dtype) for the backward pass and reads it twice, where
  differentiating the forward formula keeps the float32 centred copy and takes more passes
  (measured in docs/PERFORMANCE.md). Same derivative; float32 rounding may differ.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(xf, axis=axes)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  centred = xf - mean
  var = jnp.mean(jnp.square(centred), axis=axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  inv = jax.lax.rsqrt(var + epsilon)
  y = centred * (inv * scale) + bias
  return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon  # inside inv
  x, mean, inv, scale = residuals
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  centred = x.astype(jnp.float32) - mean
  x_hat = centred * inv
  d_bias = jnp.sum(g, axis=axes)
  d_scale = jnp.sum(g * x_hat, axis=axes)
  n = int(np.prod(x.shape[:-1]))
  sum_g, sum_g_x_hat = d_bias, d_scale
  if axis_name is not None:  # the statistics are global: so are their derivatives
    sum_g, sum_g_x_hat, g_mean, g_var = jax.lax.psum((sum_g, sum_g_x_hat, g_mean, g_var),
                                                     axis_name)
    n = n * jax.lax.psum(1, axis_name)
  dx = ((scale * inv) * (g - sum_g / n - x_hat * (sum_g_x_hat / n))
        + g_mean / n + g_var * (2.0 / n) * centred)
  return dx.astype(x.dtype), d_scale, d_bias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
