"""MinEnt (Vu et al., "ADVENT: Adversarial Entropy Minimization for Domain Adaptation in
Semantic Segmentation", CVPR 2019): direct entropy minimisation on the target softmax.

ADVENT's `entropy_loss`: the pixel-wise Shannon entropy normalised by log C, averaged over all
pixels (of the global batch), weighted by `config.adaptation.lambda_ent` (1e-3, ADVENT's
`LAMBDA_ENT_MAIN`). ADVENT also applies it, with weight 2e-4, to the output of an auxiliary
classifier on ResNet layer3; udajax's DeepLab-v2 has a single output, so only the main term is
used.
"""

import math

import jax.numpy as jnp

from udajax import losses
from udajax.methods.base import MethodOutput

STATE_FIELD = "method_state"


def entropy_loss(prob, *, axis_name=None):
  """ADVENT's normalised entropy: mean over pixels of -sum_c p log2(p + 1e-30) / log2(C).

  Args:
    prob: (B, H, W, C) softmax probabilities.
    axis_name: pmap axis name; the mean then runs over the global batch.
  Returns:
    scalar float32 in [0, 1].
  """
  prob = prob.astype(jnp.float32)
  num_classes = prob.shape[-1]
  ent = -jnp.sum(prob * jnp.log2(prob + 1e-30), axis=-1) / math.log2(num_classes)
  total, count = losses.global_sum((jnp.sum(ent), jnp.float32(ent.size)), axis_name)
  return total / count


def init_state(config, feature_dim, rng):
  del config, feature_dim, rng
  return None


def loss_terms(outputs, state, *, config, step, axis_name):
  del step
  ent = entropy_loss(outputs.target_prob, axis_name=axis_name)
  return MethodOutput({"entropy": ent}, {"entropy": config.adaptation.lambda_ent}, state)
