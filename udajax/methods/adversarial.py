"""Feature-level adversarial adaptation (Tsai et al., "Learning to Adapt Structured Output Space
for Semantic Segmentation", CVPR 2018, the "feature-level" comparison of their Table 1).

A fully-convolutional discriminator D (their `FCDiscriminator`: five 4x4 convolutions, padding
1, stride 2, 64-128-256-512-1 channels, leaky ReLU 0.2 between them, no sigmoid) looks at the
encoder features (`StepOutputs.*_feat`: ResNet-101 layer4 / VGG-16 fc7, stride 8) and tells
source (label 0) from target (label 1) with binary cross-entropy on its logits, averaged over
D's output positions of the global batch (PyTorch `BCEWithLogitsLoss`):

* segmenter term "adversarial" = BCE(D(f_t), 0): the target features are pushed to look like
  source features; weighted by `config.adaptation.lambda_adv`; D's parameters get no gradient
  from it;
* discriminator loss = BCE(D(f_s), 0) / 2 + BCE(D(f_t), 1) / 2 on the features with their
  gradient stopped; D's gradient (summed over devices) updates D with its own Adam
  (`adaptation.disc_lr` 1e-4, betas `adaptation.disc_betas` (0.9, 0.99), eps 1e-8, no weight
  decay) at the poly learning rate disc_lr * (1 - step / train.num_steps)^train.poly_power, as
  their `adjust_learning_rate_D`. Both D evaluations in a step use D's parameters from before
  the step, as their code does (D is stepped after the segmenter's backward).

Logged: "adversarial", "disc_loss", "disc_acc_source" and "disc_acc_target" (the fraction of
D's output positions classified correctly in each domain). The state is
{"params": D's params, "opt_state": its Adam state}.

`adaptation.disc_strides` (default five 2s, as theirs) exists for small inputs: D needs feature
maps of at least 32x32 positions with five stride-2 layers (images of 256x256 at stride 8).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from udajax import compiles
from udajax import losses
from udajax.errors import ConfigError
from udajax.methods.base import MethodOutput

STATE_FIELD = "method_state"
SOURCE, TARGET = 0.0, 1.0


def _torch_bias_init(key, shape, dtype=jnp.float32, *, fan_in):
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class FCDiscriminator(nn.Module):
  """(B, h, w, F) float32 features -> (B, h', w', 1) float32 domain logits.

  PyTorch's default Conv2d initialisation (weights and biases U(-1/sqrt(fan_in), ...)).
  """
  width: int = 64
  strides: Sequence[int] = (2, 2, 2, 2, 2)

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    channels = [self.width, 2 * self.width, 4 * self.width, 8 * self.width, 1]
    height, width = x.shape[1:3]
    size = np.array([height, width])
    for i, (ch, stride) in enumerate(zip(channels, self.strides)):
      size = (size + 2 - 4) // stride + 1
      if np.any(size < 1):
        raise ConfigError(
            f"config key 'adaptation.disc_strides' = {tuple(self.strides)!r}: the "
            f"discriminator's layer {i + 1} gets no output from features of "
            f"{height}x{width} positions; use larger images or more stride-1 layers")
      fan_in = 16 * x.shape[-1]
      x = nn.Conv(ch, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                  kernel_init=nn.initializers.variance_scaling(1.0 / 3, "fan_in", "uniform"),
                  bias_init=lambda k, s, d=jnp.float32, f=fan_in: _torch_bias_init(k, s, d,
                                                                                    fan_in=f),
                  precision=jax.lax.Precision.HIGHEST, name=f"conv{i + 1}")(x)
      if i < len(channels) - 1:
        x = nn.leaky_relu(x, negative_slope=0.2)
    return x


def discriminator(config) -> FCDiscriminator:
  a = config.adaptation
  return FCDiscriminator(width=a.disc_width, strides=tuple(a.disc_strides))


def bce_with_logits(logits, label: float, *, axis_name=None):
  """Mean over all elements (of the global batch) of BCE(sigmoid(logits), label), as PyTorch's
  `BCEWithLogitsLoss`: max(x, 0) - x * y + log(1 + exp(-|x|))."""
  x = logits.astype(jnp.float32)
  per = jnp.maximum(x, 0) - x * label + jnp.log1p(jnp.exp(-jnp.abs(x)))
  total, count = losses.global_sum((jnp.sum(per), jnp.float32(per.size)), axis_name)
  return total / count


def accuracy(logits, label: float, *, axis_name=None):
  """Fraction of D's outputs on the side of `label` (logit < 0 for 0, > 0 for 1)."""
  right = (logits > 0) if label > 0.5 else (logits < 0)
  total, count = losses.global_sum(
      (jnp.sum(right.astype(jnp.float32)), jnp.float32(right.size)), axis_name)
  return total / count


def disc_optimizer(config):
  b1, b2 = config.adaptation.disc_betas
  return optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8)


def disc_lr(config, step):
  t = config.train
  frac = jnp.clip(1.0 - step.astype(jnp.float32) / t.num_steps, 0.0, 1.0)
  return config.adaptation.disc_lr * frac ** t.poly_power


def init_state(config, feature_dim, rng):
  images = jnp.zeros((1, 64, 64, feature_dim()), jnp.float32)
  params = compiles.jit_init(discriminator(config).init, rng, images)["params"]
  return {"params": params, "opt_state": disc_optimizer(config).init(params)}


def discriminator_loss(params, source_feat, target_feat, *, config, axis_name=None):
  """(D's loss, (accuracy on source, accuracy on target)); the features carry no gradient."""
  model = discriminator(config)
  out_s = model.apply({"params": params}, jax.lax.stop_gradient(source_feat))
  out_t = model.apply({"params": params}, jax.lax.stop_gradient(target_feat))
  loss = (bce_with_logits(out_s, SOURCE, axis_name=axis_name) / 2
          + bce_with_logits(out_t, TARGET, axis_name=axis_name) / 2)
  return loss, (accuracy(out_s, SOURCE, axis_name=axis_name),
                accuracy(out_t, TARGET, axis_name=axis_name))


def loss_terms(outputs, state, *, config, step, axis_name):
  params = state["params"]
  adv = bce_with_logits(discriminator(config).apply({"params": params}, outputs.target_feat),
                        SOURCE, axis_name=axis_name)
  (d_loss, (acc_s, acc_t)), grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
      params, outputs.source_feat, outputs.target_feat, config=config, axis_name=axis_name)
  if axis_name is not None:
    grads = jax.lax.psum(grads, axis_name)
  updates, opt_state = disc_optimizer(config).update(grads, state["opt_state"], params)
  lr = disc_lr(config, step)
  params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
  terms = {"adversarial": adv, "disc_loss": d_loss, "disc_acc_source": acc_s,
           "disc_acc_target": acc_t}
  return MethodOutput(terms, {"adversarial": config.adaptation.lambda_adv},
                      {"params": params, "opt_state": opt_state})
