"""MaxSquare IW (Chen et al., "Domain Adaptation for Semantic Segmentation with Maximum Squares
Loss", ICCV 2019): the image-wise weighted max-square loss on the target softmax, alone.

The term is `udajax.losses.iw_max_square_loss` (the same function as the paper's "EM" term of
"clustering"), weighted by `config.loss.lambda_em` with IW ratio `config.loss.iw_ratio`.
"""

from udajax import losses
from udajax.methods.base import MethodOutput

STATE_FIELD = "method_state"


def init_state(config, feature_dim, rng):
  del config, feature_dim, rng
  return None


def loss_terms(outputs, state, *, config, step, axis_name):
  del step
  lc = config.loss
  em = losses.iw_max_square_loss(outputs.target_prob, lc.iw_ratio, axis_name=axis_name)
  return MethodOutput({"em": em}, {"em": lc.lambda_em}, state)
