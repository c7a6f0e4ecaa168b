"""DeepLab-v2 segmenter (ResNet-101 or VGG-16 backbone) in Flax linen, matching the reference.

`DeepLabV2(num_classes, backbone=...)` maps normalised images (B, H, W, 3) to
`(logits, features)`: logits (B, H, W, num_classes) upsampled with bilinear align_corners=True,
features (B, ceil-ish H/8, W/8, F) = the encoder output at stride 8 (ResNet `layer4` after its final
ReLU, F = 32·base_width = 2048; VGG `fc7` after ReLU, F = 16·vgg_width = 1024).

Exactness notes (see docs/MODEL.md):
- caffe-style ResNet: the stride sits on the first 1×1 conv of a bottleneck; the stem max-pool is
  3×3/2 pad 1 with PyTorch `ceil_mode=True`; every padding is explicit and symmetric.
- `BatchNorm` (`udajax/batch_norm.py`) is PyTorch's: two-pass batch variance for normalisation,
  running variance updated with the *unbiased* batch variance (n / (n − 1)), eps 1e-5,
  running-average decay 0.9 (PyTorch momentum 0.1); statistics are computed in float32 whatever
  the compute dtype.
- the ASPP head sums its branches; by default only the dilation-6 and -12 branches, as the
  reference's forward (it returns inside its loop) and its released checkpoints do.

Parameter tree (`params`; `batch_stats` mirrors the BN paths with `mean`/`var`):
  backbone/conv1/kernel, backbone/bn1/{scale,bias},
  backbone/layer{1..4}/block{j}/{conv1,conv2,conv3}/kernel, .../{bn1,bn2,bn3}/{scale,bias},
  backbone/layer{1..4}/block0/{downsample_conv/kernel, downsample_bn/{scale,bias}},
  VGG: backbone/{conv1_1..conv5_3,fc6,fc7}/{kernel,bias},
  classifier/conv{i}/{kernel,bias}  (i-th ASPP branch = reference `conv2d_list.i`).
Conv kernels are HWIO (`udajax.conv.Conv`). This module imports only jax/flax/numpy.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from udajax.batch_norm import BatchNorm
from udajax.conv import Conv
from udajax.ops import resize_bilinear_align_corners

BACKBONES = ("resnet101", "vgg16")


def max_pool_ceil(x, window: int = 3, stride: int = 2, padding: int = 1):
  """Max-pool with PyTorch `nn.MaxPool2d(window, stride, padding, ceil_mode=True)` semantics.

  out = ceil((in + 2·padding − window) / stride) + 1, minus one if the last window would start
  inside the right padding (PyTorch's rule). Padding is −inf, so it never wins.

  Args:
    x: (B, H, W, C).
  Returns:
    (B, out_h, out_w, C); e.g. 64×64 → 33×33 for the default 3×3/2 pad 1.
  """
  pads = [(0, 0)]
  for size in x.shape[1:3]:
    out = -(-(size + 2 * padding - window) // stride) + 1
    if (out - 1) * stride >= size + padding:
      out -= 1
    high = (out - 1) * stride + window - size - padding
    pads.append((padding, max(high, 0)))
  pads.append((0, 0))
  # A Python scalar init (not a jnp array) keeps reduce_window differentiable (max-pool VJP).
  init = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else int(jnp.iinfo(x.dtype).min)
  return jax.lax.reduce_window(x, init, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), pads)


def max_pool_floor(x, window: int = 2, stride: int = 2):
  """Max-pool without padding, floor mode (torchvision VGG's `MaxPool2d(2, 2)`). x: (B, H, W, C)."""
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")


def torch_default_bias_init(fan_in: int):
  """PyTorch's default conv bias init: U(−1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# PyTorch's default conv weight init, kaiming_uniform(a=√5) = U(−1/√fan_in, 1/√fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Reference init of ResNet convs and of the classifier weights: N(0, 0.01²).
normal_001 = nn.initializers.normal(stddev=0.01)
# torchvision VGG conv init: kaiming_normal(mode="fan_out", relu), bias 0.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel, *, stride=1, padding=0, dilation=1, use_bias=False, dtype, name,
          kernel_init=normal_001, bias_init=nn.initializers.zeros):
  """A `conv.Conv` (nn.Conv's parameters; 1×1 convolutions as matrix products)."""
  return Conv(features, kernel, stride=stride, padding=padding, dilation=dilation,
              use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, bias_init=bias_init,
              name=name)


def residual_relu(v):
  """ReLU of a block's output, max(v, 0) with NaN kept, written as a select (same values).

  Why not `nn.relu` (a `maximum`): XLA's CPU fusion pass may recompute a cheap elementwise value
  inside each consumer instead of reading it. A `maximum` with a constant counts as unary, so the
  backward pass's consumers of a block output re-derived it from the previous block's output,
  and so on down the stage: each of ResNet-101's 23 layer3 blocks recomputed the whole chain
  (docs/PERFORMANCE.md). A select reads two full-size operands (the mask and `v`), which XLA
  does not duplicate into consumers it cannot all fuse with, so each block output is computed
  once and read from memory. Gradient: 0 at v ≤ 0, 1 above and at NaN (as torch's ReLU; `nn.relu`
  gives 0 at NaN; either way the NaN guard skips such a step).
  """
  return jnp.where(v <= 0, jnp.zeros((), v.dtype), v)


class Bottleneck(nn.Module):
  """caffe-style bottleneck: 1×1 (stride) → 3×3 (dilation d, pad d) → 1×1 (4× width); residual."""
  width: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    """x: (B, H, W, Cin) → (B, H', W', 4·width), H' = (H − 1) // stride + 1."""
    def bn(name):
      return BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name=name)
    d = self.dilation
    out = _conv(self.width, 1, stride=self.stride, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(bn("bn1")(out, train))
    out = _conv(self.width, 3, padding=d, dilation=d, dtype=self.dtype, name="conv2")(out)
    out = nn.relu(bn("bn2")(out, train))
    out = _conv(4 * self.width, 1, dtype=self.dtype, name="conv3")(out)
    out = bn("bn3")(out, train)
    if self.downsample:
      residual = _conv(4 * self.width, 1, stride=self.stride, dtype=self.dtype,
                       name="downsample_conv")(x)
      residual = bn("downsample_bn")(residual, train)
    else:
      residual = x
    return residual_relu(out + residual)


_REMAT_VARS = ("params", "batch_stats")


def checkpointed_call(module: nn.Module, x, train: bool):
  """`module(x, train)` with its activations recomputed in the backward pass, not stored.

  Only `x` (and the module's variables, which are stored anyway) are kept for the backward
  pass; the backward pass re-runs the forward of an unbound copy of `module` and takes its vjp.
  Unlike `nn.remat`/`jax.checkpoint`, the recomputation is tied to the incoming cotangent with an
  optimisation barrier, so XLA cannot schedule the recomputed activations of every block before
  the backward pass reaches them (it does so on CPU, where `jax.checkpoint` then raises the peak
  memory instead of lowering it). Gradients are those of the plain call (same operations, same
  order). Variables other than `params` (e.g. BatchNorm statistics) are updated by the forward
  as usual.

  Args:
    module: a Module (not yet bound) to call as `module(x, train)`.
    x: its input array.
    train: passed through (static).
  Returns:
    module(x, train).
  """

  unbound = module.clone(parent=None, name=None)  # re-applied in the backward pass

  def fn(mdl, x):
    return mdl(x, train)

  def fwd(mdl, x):
    # Residuals: the input and the variables before the call (stored anyway).
    variables = {k: mdl.variables[k] for k in _REMAT_VARS if k in mdl.variables}
    return mdl(x, train), (x, variables)

  def bwd(res, g):
    x, variables, g = jax.lax.optimization_barrier(res + (g,))
    params = variables["params"]
    # XLA's CPU compiler removes optimisation barriers before common-subexpression elimination,
    # which would merge the recomputation back into the forward pass. A data dependence on the
    # cotangent (x + 0·g[0], exact for finite g) keeps it here on every backend.
    x = x + (jnp.zeros((), g.dtype) * g.reshape(-1)[0]).astype(x.dtype)

    def pure(params, x):
      # Statistics are created fresh (mutable) and discarded: only the output is needed.
      y, _ = unbound.apply({"params": params}, x, train, mutable=True)
      return y

    _, vjp = jax.vjp(pure, params, x)
    d_params, d_x = vjp(g)
    # BN statistics are differentiable inputs here only so that they are not closed over (a
    # closed-over traced value cannot enter a custom_vjp); nothing depends on them: zero.
    d_vars = {k: jax.tree_util.tree_map(jnp.zeros_like, v) for k, v in variables.items()}
    d_vars["params"] = d_params
    return d_vars, d_x

  return nn.custom_vjp(fn, forward_fn=fwd, backward_fn=bwd, grad_vars=list(_REMAT_VARS))(
      module, x)


class ResLayer(nn.Module):
  """One ResNet stage (`layerN`): `blocks` bottlenecks, the first with the projection shortcut."""
  width: int
  blocks: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    for j in range(self.blocks):
      # The reference projects on the first block of every stage (its _make_layer condition
      # holds for all four stages of DeepLab-v2).
      block = Bottleneck(self.width, stride=self.stride if j == 0 else 1, dilation=self.dilation,
                         downsample=(j == 0), dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                         name=f"block{j}")
      if self.remat and not self.is_initializing():
        x = checkpointed_call(block, x, train)
      else:
        x = block(x, train)
    return x


class ResNetBackbone(nn.Module):
  """DeepLab-v2 ResNet encoder at output stride 8. (B, H, W, 3) → (B, h, w, 32·base_width)."""
  stage_blocks: Sequence[int] = (3, 4, 23, 3)
  base_width: int = 64
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if len(self.stage_blocks) != 4:
      raise ValueError(f"stage_blocks must have 4 entries, got {self.stage_blocks}")
    w = self.base_width
    x = _conv(w, 7, stride=2, padding=3, dtype=self.dtype, name="conv1")(x)
    x = BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name="bn1")(x, train)
    x = max_pool_ceil(nn.relu(x), 3, 2, 1)
    strides = (1, 2, 1, 1)
    dilations = (1, 1, 2, 4)
    for i, blocks in enumerate(self.stage_blocks):
      x = ResLayer(w * 2 ** i, blocks, stride=strides[i], dilation=dilations[i], dtype=self.dtype,
                   bn_axis_name=self.bn_axis_name, remat=self.remat,
                   name=f"layer{i + 1}")(x, train)
    return x


# (name, output channels as a multiple of vgg_width, dilation, max-pool after it).
_VGG_LAYERS = (
    ("conv1_1", 1, 1, False), ("conv1_2", 1, 1, True),
    ("conv2_1", 2, 1, False), ("conv2_2", 2, 1, True),
    ("conv3_1", 4, 1, False), ("conv3_2", 4, 1, False), ("conv3_3", 4, 1, True),
    ("conv4_1", 8, 1, False), ("conv4_2", 8, 1, False), ("conv4_3", 8, 1, False),
    ("conv5_1", 8, 2, False), ("conv5_2", 8, 2, False), ("conv5_3", 8, 2, False),
)
VGG_CONV_NAMES = tuple(layer[0] for layer in _VGG_LAYERS)


class VGGBackbone(nn.Module):
  """DeepLab-v2 VGG-16 encoder: torchvision vgg16 features without pool4/pool5, conv5 at
  dilation 2, then fc6/fc7 (3×3, dilation 4) with ReLU. (B, H, W, 3) → (B, h, w, 16·vgg_width)."""
  vgg_width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train  # no BN, no dropout
    in_ch = x.shape[-1]
    for name, mult, dil, pool in _VGG_LAYERS:
      x = _conv(mult * self.vgg_width, 3, padding=dil, dilation=dil, use_bias=True,
                dtype=self.dtype, name=name, kernel_init=kaiming_normal_fan_out)(x)
      x = nn.relu(x)
      in_ch = mult * self.vgg_width
      if pool:
        x = max_pool_floor(x, 2, 2)
    fc = 16 * self.vgg_width
    for name in ("fc6", "fc7"):
      x = _conv(fc, 3, padding=4, dilation=4, use_bias=True, dtype=self.dtype, name=name,
                kernel_init=torch_default_kernel_init,
                bias_init=torch_default_bias_init(in_ch * 9))(x)
      x = nn.relu(x)
      in_ch = fc
    return x


class ASPP(nn.Module):
  """DeepLab-v2 classifier: sum of 3×3 convs with bias at dilation = padding ∈ `dilations`.

  Weights N(0, 0.01²) as the reference; biases keep PyTorch's default U(±1/√(9·Cin)) (the
  reference never re-initialises them). (B, h, w, Cin) → (B, h, w, num_classes).
  """
  num_classes: int
  dilations: Sequence[int] = (6, 12)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1] * 9
    out = None
    for i, d in enumerate(self.dilations):
      y = _conv(self.num_classes, 3, padding=d, dilation=d, use_bias=True, dtype=self.dtype,
                name=f"conv{i}", kernel_init=normal_001,
                bias_init=torch_default_bias_init(fan_in))(x)
      out = y if out is None else out + y
    return out


class DeepLabV2(nn.Module):
  """DeepLab-v2 with a ResNet-101 (caffe-style) or VGG-16 backbone.

  Attributes:
    num_classes: output classes.
    backbone: "resnet101" or "vgg16".
    stage_blocks, base_width: ResNet depth/width (tiny nets for tests/demo: (1, 1, 1, 1), 8).
    vgg_width: VGG conv1 width (64 = torchvision); every VGG width scales with it, fc6/fc7 = 16×.
    aspp_dilations: ASPP branches; (6, 12) = reference behaviour, (6, 12, 18, 24) = all four.
    dtype: compute dtype (params and BN statistics stay float32; outputs are float32).
    bn_axis_name: pmap axis name for synchronised BatchNorm, or None.
    remat: recompute each ResNet bottleneck in the backward pass from its input instead of
      storing its activations (`checkpointed_call`): same gradients, much lower peak memory.

  `apply(variables, images, train=...)`: images (B, H, W, 3) normalised float32 →
  `(logits (B, H, W, num_classes), features (B, h, w, F))`, both float32, h, w at stride 8.
  Train mode uses batch statistics and needs `mutable=["batch_stats"]` (ResNet).
  """
  num_classes: int
  backbone: str = "resnet101"
  stage_blocks: Sequence[int] = (3, 4, 23, 3)
  base_width: int = 64
  vgg_width: int = 64
  aspp_dilations: Sequence[int] = (6, 12)
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False) -> Tuple[jax.Array, jax.Array]:
    if images.ndim != 4:
      raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    x = images.astype(self.dtype)
    if self.backbone == "resnet101":
      feats = ResNetBackbone(tuple(self.stage_blocks), self.base_width, dtype=self.dtype,
                             bn_axis_name=self.bn_axis_name, remat=self.remat,
                             name="backbone")(x, train)
    elif self.backbone == "vgg16":
      feats = VGGBackbone(self.vgg_width, dtype=self.dtype, name="backbone")(x, train)
    else:
      raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
    logits = ASPP(self.num_classes, tuple(self.aspp_dilations), dtype=self.dtype,
                  name="classifier")(feats)
    logits = resize_bilinear_align_corners(logits.astype(jnp.float32), images.shape[1:3])
    return logits, feats.astype(jnp.float32)
