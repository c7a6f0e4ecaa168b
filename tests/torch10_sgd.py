"""torch 1.0.0's `torch.optim.SGD.step` transcribed (momentum, no dampening, no Nesterov), and the
authors' parameter groups built as their `optim_parameters` builds them.

torch 1.0.0 does not install on this Python, so its documented step is written out here:

    for group in param_groups:            # in order
      for p in group["params"]:           # duplicates kept: one pass per entry
        if p.grad is None: continue
        d_p = p.grad;  d_p += weight_decay * p          # in place: p.grad keeps the sum
        buf = state[p]["momentum_buffer"]               # one per tensor, shared by its entries
        first use ever: buf = d_p (copy); else: buf = momentum * buf + d_p
        p -= lr * buf

Later torch versions add the weight decay out of place (`d_p = d_p.add(p, alpha=wd)`), which
leaves p.grad untouched and gives a different trajectory when a tensor is listed more than once.
"""

import torch
from torch import nn


class Torch10SGD:
  """torch 1.0.0 SGD with momentum on explicit parameter groups (lists keep duplicates)."""

  def __init__(self, param_groups, momentum=0.9, weight_decay=5e-4):
    self.param_groups = [{"params": list(g["params"]), "lr": g["lr"]} for g in param_groups]
    self.momentum, self.weight_decay = momentum, weight_decay
    self.state = {}

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is None:
          continue
        d_p = p.grad
        if self.weight_decay != 0:
          d_p.add_(p, alpha=self.weight_decay)
        state = self.state.setdefault(p, {})
        if "momentum_buffer" not in state:
          buf = state["momentum_buffer"] = d_p.clone()
        else:
          buf = state["momentum_buffer"]
          buf.mul_(self.momentum).add_(d_p)
        p.add_(buf, alpha=-group["lr"])

  def zero_grad(self):
    for group in self.param_groups:
      for p in group["params"]:
        p.grad = None


def _one_x_entries(blocks):
  """The authors' get_1x_lr_params_NOscale: j.parameters() for every j in b.modules()."""
  for b in blocks:
    for module in b.modules():
      for p in module.parameters():
        if p.requires_grad:
          yield p


def reference_param_groups(model, lr, dedup=False):
  """The authors' optim_parameters(args) for a tests/torch_reference_models model.

  ResNet (has `layer6`): 1x = conv1, bn1 (frozen: requires_grad must be False), layer1..4;
  10x = layer5 + layer6 parameters. VGG: 1x = features; 10x = classifier. Their poly scheduler
  sets group 1 to 10x the lr before every step, for both backbones. `dedup` keeps the first entry
  of each tensor only (one update per tensor: the textbook SGD).
  """
  if hasattr(model, "layer6"):
    one = [model.conv1, model.bn1, model.layer1, model.layer2, model.layer3, model.layer4]
    head = list(model.layer5.parameters()) + list(model.layer6.parameters())
  else:
    one = [model.features]
    head = list(model.classifier.parameters())
  ones = list(_one_x_entries(one))
  if dedup:
    seen, unique = set(), []
    for p in ones:
      if id(p) not in seen:
        seen.add(id(p))
        unique.append(p)
    ones = unique
  return [{"params": ones, "lr": lr}, {"params": head, "lr": 10 * lr}]


def freeze_stem_bn(model: nn.Module):
  """requires_grad=False on the ResNet stem BN, as the authors' DeeplabResnet.__init__ does."""
  for p in model.bn1.parameters():
    p.requires_grad = False
  return model
