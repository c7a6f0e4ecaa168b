"""The paper's objective (Toldo et al., WACV 2021): clustering, orthogonality and sparsity of the
encoder features (`udajax.losses.feature_regularization`) plus the IW max-square "EM" term.

Weights and options are `config.loss.*` (lambda_cl, lambda_or, lambda_sp, lambda_em, iw_ratio,
cluster_norm_order, ortho_temperature, sparsity_rho, sparsity_power, source_assignment,
centroid_smoothing); a term whose lambda is 0 is neither computed nor logged. The state is the
smoothed centroids (`centroid_smoothing` >= 0; otherwise None).
"""

import jax.numpy as jnp

from udajax import losses
from udajax.methods.base import MethodOutput

# Kept from before methods existed, so that older work directories resume.
STATE_FIELD = "centroid_state"


def _smoothing(config):
  lc = config.loss
  use_feat = lc.lambda_cl > 0 or lc.lambda_or > 0 or lc.lambda_sp > 0
  return lc.centroid_smoothing if (use_feat and lc.centroid_smoothing >= 0) else None


def init_state(config, feature_dim, rng):
  del rng
  if config.loss.centroid_smoothing < 0:
    return None
  return losses.init_centroid_state(config.num_classes, feature_dim())


def loss_terms(outputs, state, *, config, step, axis_name):
  """Terms "em", "c_dist", "f_dist_source", "f_dist_target", "clustering", "orthogonality",
  "sparsity" (those with a non-zero lambda); weighted: em, clustering, orthogonality, sparsity.
  """
  del step
  lc = config.loss
  terms, weights = {}, {}
  if lc.lambda_em > 0:
    terms["em"] = losses.iw_max_square_loss(outputs.target_prob, lc.iw_ratio,
                                            axis_name=axis_name)
    weights["em"] = lc.lambda_em
  if not (lc.lambda_cl > 0 or lc.lambda_or > 0 or lc.lambda_sp > 0):
    return MethodOutput(terms, weights, state)
  smoothing = _smoothing(config)
  reg = losses.feature_regularization(
      outputs.source_feat.astype(jnp.float32), outputs.source_prob,
      outputs.target_feat.astype(jnp.float32), outputs.target_prob,
      num_classes=config.num_classes, cluster_norm_order=lc.cluster_norm_order,
      ortho_temperature=lc.ortho_temperature, sparsity_rho=lc.sparsity_rho,
      sparsity_power=lc.sparsity_power,
      source_labels=outputs.source_label if lc.source_assignment == "labels" else None,
      axis_name=axis_name, centroid_smoothing=smoothing,
      centroid_state=state if smoothing is not None else None)
  if smoothing is not None:
    state = reg["centroid_state"]
  if lc.lambda_cl > 0:
    for k in ("c_dist", "f_dist_source", "f_dist_target"):
      terms[k] = reg[k]
    terms["clustering"] = reg["f_dist_source"] + reg["f_dist_target"] - reg["c_dist"]
    weights["clustering"] = lc.lambda_cl
  if lc.lambda_or > 0:
    terms["orthogonality"] = reg["ortho_loss"]
    weights["orthogonality"] = lc.lambda_or
  if lc.lambda_sp > 0:
    terms["sparsity"] = reg["sparse_loss"]
    weights["sparsity"] = lc.lambda_sp
  return MethodOutput(terms, weights, state)
