"""The optimisers: the authors' SGD as their code runs it (default) and the textbook SGD.

Both follow the reference's settings: momentum 0.9, weight decay 5e-4 added to the gradient, poly
lr ``lr * (1 - step / num_steps) ** 0.9`` and `head_lr_mult` (10) times the lr on the classifier
head; parameters the reference never trains (the stem BN's scale and bias of ResNet-101) get no
update and no weight decay, as ``requires_grad=False`` does in PyTorch.

``"sgd"`` (`make_optimizer(optimizer="sgd")`): one update per tensor per step, as the paper
describes and as ``torch.optim.SGD`` does for a tensor listed once,

    g <- g + wd * p;   buf <- momentum * buf + g  (buf = g on the first step);   p <- p - lr_t * buf

which is exactly ``add_decayed_weights(wd) -> trace(momentum) -> scale(-lr_t)`` in optax.

``"reference_sgd"`` (the default): the optimiser the authors' code builds and the one that trained
the paper's models. Their ``get_1x_lr_params_NOscale`` yields ``j.parameters()`` for every module
``j`` in ``b.modules()``, so a backbone tensor enters the 1x parameter group once per module that
contains it, and PyTorch's SGD runs its per-parameter update once per entry. The number of entries
of each tensor (`entries_per_tensor`):

  ResNet-101 (b = conv1, bn1, layer1..layer4):
    backbone/conv1                               1  (the stem conv: only itself)
    backbone/bn1                                 0  (frozen: requires_grad=False)
    backbone/layerN/blockJ/{conv,bn}{1,2,3}      3  (the stage's Sequential, the Bottleneck, itself)
    backbone/layerN/blockJ/downsample_{conv,bn}  4  (... and the downsample Sequential)
  VGG-16 (b = features, a Sequential holding the 13 convs and fc6/fc7):
    backbone/conv*_*, backbone/fc6, backbone/fc7 2  (the Sequential, itself)
  classifier/* (the 10x group, built from .parameters()): 1.

torch 1.0.0 (the version the authors' code pins) does, for each entry p of a group, in order:

    d = p.grad;  d += wd * p  (in place: the stored gradient keeps the added term)
    buf = momentum * buf + d  (buf = d on the first use of p ever; one buffer per tensor)
    p -= lr * buf

A tensor listed k times therefore gets k such sub-updates per step, each seeing the parameter the
previous one left, with the weight-decay terms accumulating in d. `reference_sgd` does exactly
that per leaf. Entries of different tensors never interact, so their order does not matter.
Under pmap the gradient is summed over devices before the update, so the result does not depend
on the device count. The optimiser state is one momentum buffer per tensor plus the step count.
"""

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

# Parameter-path prefixes (tuples of keys) the reference keeps frozen.
RESNET_FROZEN_PREFIXES = (("backbone", "bn1"),)
HEAD_PREFIX = ("classifier",)
OPTIMIZERS = ("reference_sgd", "sgd")


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


def _entries(keys: tuple) -> int:
  """Entries of the parameter at `keys` in the authors' SGD parameter groups (0 = in none)."""
  if keys[:1] == HEAD_PREFIX:
    return 1
  if keys[:1] == ("backbone",) and len(keys) >= 3:
    module = keys[1]
    if module == "bn1":
      return 0
    if module == "conv1" and len(keys) == 3:
      return 1
    if re.fullmatch(r"layer\d+", module) and len(keys) == 5:
      if keys[3] in ("downsample_conv", "downsample_bn"):
        return 4
      if re.fullmatch(r"(conv|bn)[123]", keys[3]):
        return 3
    if re.fullmatch(r"conv\d+_\d+|fc[67]", module) and len(keys) == 3:
      return 2
  raise ValueError(f"parameter {'/'.join(map(str, keys))} matches no rule of the authors' "
                   "parameter groups (udajax.optim.entries_per_tensor); use "
                   "--config.train.optimizer=sgd for models other than DeepLab-v2 "
                   "ResNet-101/VGG-16")


def entries_per_tensor(params):
  """Tree like `params` of ints: how often each tensor is listed in the authors' SGD groups.

  1 for the ResNet stem conv and every classifier tensor, 0 for the frozen ResNet stem BN, 3 for
  bottleneck convs/BNs, 4 for downsample convs/BNs, 2 for every VGG-16 backbone tensor (see the
  module docstring). Raises ValueError for a path no rule covers.
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: _entries(_path_keys(p)), params)


class ReferenceSGDState(NamedTuple):
  """State of `reference_sgd`: the step count and one momentum buffer per tensor."""
  count: jnp.ndarray
  trace: Any


def reference_sgd(schedule: Callable, *, momentum: float = 0.9, weight_decay: float = 5e-4,
                  head_lr_mult: float = 10.0) -> optax.GradientTransformation:
  """The authors' SGD as torch 1.0.0 runs it on their parameter groups (module docstring).

  Per tensor listed k times (`entries_per_tensor`), with lr = schedule(count), times
  `head_lr_mult` for the classifier, and d = the gradient:
    repeat k times:  d <- d + wd * p;  buf <- momentum * buf + d;  p <- p - lr * buf.
  The update returned is (p after the k sub-updates) - p. `params` is required.
  """

  def init(params):
    return ReferenceSGDState(count=jnp.zeros([], jnp.int32),
                             trace=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("reference_sgd needs the parameters: call update(grads, state, params)")
    lr = schedule(state.count)
    head_lr = head_lr_mult * lr

    def one(path, g, buf, p):
      keys = _path_keys(path)
      k = _entries(keys)
      if k == 0:
        return jnp.zeros_like(p), buf
      rate = (head_lr if keys[:1] == HEAD_PREFIX else lr).astype(p.dtype)
      d, q = g.astype(p.dtype), p
      for _ in range(k):
        d = d + weight_decay * q
        buf = momentum * buf + d
        q = q - rate * buf
      return q - p, buf

    pairs = jax.tree_util.tree_map_with_path(one, grads, state.trace, params)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    updates = jax.tree_util.tree_map(lambda t: t[0], pairs, is_leaf=is_pair)
    trace = jax.tree_util.tree_map(lambda t: t[1], pairs, is_leaf=is_pair)
    return updates, ReferenceSGDState(count=optax.safe_int32_increment(state.count),
                                      trace=trace)

  return optax.GradientTransformation(init, update)


def make_optimizer(*, learning_rate: float, num_steps: int, optimizer: str = "reference_sgd",
                   momentum: float = 0.9, weight_decay: float = 5e-4, poly_power: float = 0.9,
                   head_lr_mult: float = 10.0, frozen_prefixes: Sequence[tuple] = ()):
  """Returns (optax transformation, lr schedule of the backbone).

  optimizer: "reference_sgd" (the authors' SGD as their code runs it; its frozen set comes from
  the parameter paths, `frozen_prefixes` is not used) or "sgd" (one PyTorch-SGD update per tensor,
  frozen set = `frozen_prefixes`).
  """
  schedule = poly_schedule(learning_rate, num_steps, poly_power)
  if optimizer == "reference_sgd":
    return reference_sgd(schedule, momentum=momentum, weight_decay=weight_decay,
                         head_lr_mult=head_lr_mult), schedule
  if optimizer != "sgd":
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")

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
