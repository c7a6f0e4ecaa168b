"""The model's convolution layer: `nn.Conv`'s parameters and results, faster 1×1 convolutions.

`Conv` has the parameters of `flax.linen.Conv` (`kernel` (k, k, Cin, Cout) HWIO, optional
`bias` (Cout,)), created with the same names, shapes and initialisers, so checkpoints and the
PyTorch converter are unchanged. k×k convolutions (k > 1) are `lax.conv_general_dilated`, as
in `nn.Conv`. 1×1 convolutions, half of ResNet-101's FLOPs, are `pointwise_conv`: one matrix
product per pass with a hand-written backward pass:

  forward          y  = x_s · W           x_s = x[:, ::s, ::s]: (B·H'·W', Cin) · (Cin, Cout)
  input gradient   dx = scatter_s(g · Wᵀ) zeros between the strided positions
  kernel gradient  dW = x_sᵀ · g          (Cin, B·H'·W') · (B·H'·W', Cout), no transpose copy

Why (XLA's CPU backend, measured in docs/PERFORMANCE.md): XLA differentiates a convolution into
a kernel-gradient convolution whose input is a transposed copy of the layer input; its fusion
pass may recompute that input inside the copy instead of reading it, and for the residual chain
of a ResNet stage it recomputed every earlier block's output in every block's copy (quadratic
in the depth: about half of the step time at ResNet-101 depth). A matrix product reads its
operands from memory, which cuts the chain, and is also faster than XLA's CPU convolution for
these shapes. The sums are the same; only the summation order can differ (float32 rounding).
"""

import functools
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

_DOT_LAST_FIRST = (((3,), (0,)), ((), ()))   # (B, H, W, Cin) · (Cin, Cout)
_DOT_LAST_LAST = (((3,), (1,)), ((), ()))    # (B, H, W, Cout) · (Cin, Cout)ᵀ
_DOT_FIRST_FIRST = (((0,), (0,)), ((), ()))  # (N, Cin)ᵀ · (N, Cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pointwise_conv(x, kernel, stride: int = 1):
  """1×1 convolution, no padding: x (B, H, W, Cin), kernel (1, 1, Cin, Cout) → (B, H', W', Cout).

  H' = (H − 1) // stride + 1 (as `lax.conv_general_dilated` with stride `stride`, no padding).
  `x` and `kernel` must have the same dtype; the result has it too. Products are accumulated
  in float32 (bfloat16 inputs: as XLA's convolutions accumulate).
  """
  return _pointwise_fwd(x, kernel, stride)[0]


def _pointwise_fwd(x, kernel, stride):
  xs = x[:, ::stride, ::stride, :] if stride > 1 else x
  return _dot(xs, kernel[0, 0], _DOT_LAST_FIRST, x.dtype), (xs, kernel, x.shape)


def _pointwise_bwd(stride, residuals, g):
  xs, kernel, x_shape = residuals
  cin, cout = kernel.shape[2:]
  dxs = _dot(g, kernel[0, 0], _DOT_LAST_LAST, xs.dtype)
  if stride > 1:  # back onto the strided positions of the full input, zeros elsewhere
    pads = [(0, 0, 0)] + [(0, n - ((m - 1) * stride + 1), stride - 1)
                          for n, m in zip(x_shape[1:3], dxs.shape[1:3])] + [(0, 0, 0)]
    dxs = lax.pad(dxs, jnp.zeros((), dxs.dtype), pads)
  dw = _dot(xs.reshape(-1, cin), g.reshape(-1, cout), _DOT_FIRST_FIRST, kernel.dtype)
  return dxs, dw.reshape(kernel.shape)


def _dot(a, b, dimension_numbers, dtype):
  """dot_general accumulated in float32 (exact no-op for float32), rounded to `dtype`."""
  return lax.dot_general(a, b, dimension_numbers,
                         preferred_element_type=jnp.float32).astype(dtype)


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)


class Conv(nn.Module):
  """2-D convolution, NHWC, square kernel, explicit symmetric padding: `nn.Conv`'s parameters.

  Attributes:
    features: Cout.
    kernel_size: k (the kernel is k × k).
    stride, padding, dilation: as in `nn.Conv(strides=(s, s), padding=((p, p), (p, p)),
      kernel_dilation=(d, d))`.
    use_bias: add a `bias` (Cout,) parameter.
    dtype: computation dtype (inputs, kernel and bias are cast to it, as `nn.Conv` does).
    kernel_init, bias_init: initialisers of the float32 parameters.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, Cin) → (B, H', W', features)."""
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1 and self.padding == 0:
      y = pointwise_conv(x, kernel, self.stride)
    else:
      y = lax.conv_general_dilated(
          x, kernel, window_strides=(self.stride, self.stride),
          padding=_pairs(self.padding), rhs_dilation=(self.dilation, self.dilation),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def _pairs(p: int) -> Sequence[Tuple[int, int]]:
  return ((p, p), (p, p))
