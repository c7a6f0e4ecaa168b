"""Optimiser of the reference: PyTorch SGD with momentum, weight decay, poly lr, 10x head lr.

PyTorch's `torch.optim.SGD(lr, momentum=0.9, weight_decay=5e-4)` does, per step t (lr_t from the
schedule):

    g <- g + wd * p;   buf <- momentum * buf + g  (buf = g on the first step);   p <- p - lr_t * buf

which is exactly `add_decayed_weights(wd) -> trace(momentum) -> scale(-lr_t)` in optax (optax's
trace starts at zero, so its first value is g, like PyTorch's buffer). The classifier head gets
`head_lr_mult` (10) times the lr; parameters the reference never trains (the stem BN's scale and
bias of ResNet-101) get no update and no weight decay, as `requires_grad=False` does in PyTorch.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

# Parameter-path prefixes (tuples of keys) the reference keeps frozen.
RESNET_FROZEN_PREFIXES = (("backbone", "bn1"),)
HEAD_PREFIX = ("classifier",)


def poly_schedule(base_lr: float, num_steps: int, power: float = 0.9) -> Callable:
  """lr(step) = base_lr * (1 - step / num_steps) ** power (0 from num_steps on)."""
  def schedule(step):
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / num_steps, 0.0, 1.0)
    return base_lr * (1.0 - frac) ** power
  return schedule


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def param_labels(params, frozen_prefixes: Sequence[tuple] = ()):
  """Labels each parameter "head", "frozen" or "backbone" by its path in the tree."""
  def label(path, _):
    keys = _path_keys(path)
    if keys[:len(HEAD_PREFIX)] == HEAD_PREFIX:
      return "head"
    if any(keys[:len(p)] == tuple(p) for p in frozen_prefixes):
      return "frozen"
    return "backbone"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(*, learning_rate: float, num_steps: int, momentum: float = 0.9,
                   weight_decay: float = 5e-4, poly_power: float = 0.9,
                   head_lr_mult: float = 10.0, frozen_prefixes: Sequence[tuple] = ()):
  """Returns (optax transformation, lr schedule of the backbone) following PyTorch SGD."""
  schedule = poly_schedule(learning_rate, num_steps, poly_power)

  def head_schedule(step):
    return head_lr_mult * schedule(step)

  def sgd(lr_fn):
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_schedule(lambda step: -lr_fn(step)),
    )

  tx = optax.multi_transform(
      {"backbone": sgd(schedule), "head": sgd(head_schedule), "frozen": optax.set_to_zero()},
      lambda params: param_labels(params, frozen_prefixes),
  )
  return tx, schedule
