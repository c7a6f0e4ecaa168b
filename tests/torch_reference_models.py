"""Independent PyTorch DeepLab-v2 (ResNet / VGG-16) used only by tests as ground truth.

Written from the description of the reference architecture in docs/MODEL.md, with the
reference's state-dict key layout so its `state_dict()` can be saved in every layout the
converter reads:
  ResNet: conv1, bn1, layer{1..4}.{j}.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1},
          layer5.conv2d_list.{k} (stage-3 head, never used), layer6.conv2d_list.{k} (the head).
  VGG (reference layout): features.{0,2,5,7,10,12,14,17,19,21,23,25,27} convs, features.29 fc6,
          features.31 fc7, classifier.conv2d_list.{k}.
`vgg_reference_to_torchvision` rewrites a reference VGG state dict to torchvision's vgg16 layout.
Every head holds four branches (dilations 6, 12, 18, 24) but sums only the first `used_branches`.
"""

import torch
from torch import nn
import torch.nn.functional as F


class TorchHead(nn.Module):
  """Four 3×3 dilated convs; forward sums the first `used` of them."""

  def __init__(self, in_ch, num_classes, used=2, dilations=(6, 12, 18, 24)):
    super().__init__()
    self.used = used
    self.conv2d_list = nn.ModuleList(
        nn.Conv2d(in_ch, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)

  def forward(self, x):
    return sum(self.conv2d_list[k](x) for k in range(self.used))


class TorchBottleneck(nn.Module):

  def __init__(self, cin, width, stride, dilation, project):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 1, stride=stride, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * width)
    if project:
      self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(4 * width))
    else:
      self.downsample = None

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    skip = x if self.downsample is None else self.downsample(x)
    return F.relu(y + skip)


class TorchDeepLabResNet(nn.Module):
  """Returns (logits NCHW at input size, layer4 features NCHW)."""

  def __init__(self, num_classes, stage_blocks=(3, 4, 23, 3), base_width=64, used_branches=2):
    super().__init__()
    w = base_width
    self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(w)
    self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    cin = w
    for i, (n, stride, dil) in enumerate(zip(stage_blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
      width = w * 2 ** i
      blocks = []
      for j in range(n):
        blocks.append(TorchBottleneck(cin, width, stride if j == 0 else 1, dil, j == 0))
        cin = 4 * width
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.layer5 = TorchHead(16 * w, num_classes, used_branches)
    self.layer6 = TorchHead(32 * w, num_classes, used_branches)

  def forward(self, x):
    size = x.shape[2:]
    x = self.pool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    logits = F.interpolate(self.layer6(x), size=size, mode="bilinear", align_corners=True)
    return logits, x


# torchvision vgg16 `features` indices of the 13 convs, and the reference's after removing pools.
TORCHVISION_VGG_CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
REFERENCE_VGG_CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 23, 25, 27)
REFERENCE_VGG_FC_IDX = (29, 31)


class TorchDeepLabVGG(nn.Module):
  """Returns (logits NCHW at input size, fc7 features NCHW)."""

  def __init__(self, num_classes, vgg_width=64, used_branches=2):
    super().__init__()
    w = vgg_width
    plan = [w, w, "P", 2 * w, 2 * w, "P", 4 * w, 4 * w, 4 * w, "P", 8 * w, 8 * w, 8 * w]
    layers, cin = [], 3
    for item in plan:
      if item == "P":
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
        cin = item
    for _ in range(3):  # conv5 at dilation 2
      layers += [nn.Conv2d(cin, 8 * w, 3, padding=2, dilation=2), nn.ReLU()]
    layers += [nn.Conv2d(8 * w, 16 * w, 3, padding=4, dilation=4), nn.ReLU(),
               nn.Conv2d(16 * w, 16 * w, 3, padding=4, dilation=4), nn.ReLU()]
    self.features = nn.Sequential(*layers)
    self.classifier = TorchHead(16 * w, num_classes, used_branches)

  def forward(self, x):
    size = x.shape[2:]
    feat = self.features(x)
    logits = F.interpolate(self.classifier(feat), size=size, mode="bilinear", align_corners=True)
    return logits, feat


def vgg_reference_to_torchvision(state_dict, fc_sizes=(8, 8, 5)):
  """torchvision vgg16 layout of a reference VGG state dict: conv indices shifted, no fc6/fc7,
  no ASPP head, plus `classifier.{0,3,6}` fully-connected tensors (tiny stand-ins here)."""
  remap = dict(zip(REFERENCE_VGG_CONV_IDX, TORCHVISION_VGG_CONV_IDX))
  out = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if parts[0] == "features" and int(parts[1]) in remap:
      out[f"features.{remap[int(parts[1])]}.{parts[2]}"] = value
  a, b, c = fc_sizes
  for idx, (o, i) in zip((0, 3, 6), ((a, 7), (b, a), (c, b))):
    out[f"classifier.{idx}.weight"] = torch.randn(o, i)
    out[f"classifier.{idx}.bias"] = torch.randn(o)
  return out


def randomize_(model, seed=0):
  """Random weights with He-like conv scales and non-trivial BN (affine and running stats)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, m in model.named_modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        # Keep the residual branches small so a 33-block net stays well conditioned.
        hi = 0.4 if name.endswith("bn3") else 1.5
        m.weight.copy_(torch.rand(c, generator=g) * (hi - 0.2) + 0.2)
        m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        m.num_batches_tracked.fill_(7)
  return model


def save_layout(model, path, layout):
  """Saves `model.state_dict()` to `path` in one of the key layouts users have:

  - "scale": ImageNet-init style, keys `Scale.<key>`, no `num_batches_tracked`, no `layer6`
    (the head of that file is `layer5`);
  - "reference": the reference trainer's `{"state_dict": {"module.<key>": ...}, "optimizer": ...,
    "epoch": ..., "best_MIou": numpy float}`;
  - "bare": the plain state dict;
  - "torchvision": torchvision vgg16 layout (VGG models only).
  """
  import numpy as np
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  if layout == "scale":
    obj = {f"Scale.{k}": v for k, v in sd.items()
           if not k.endswith("num_batches_tracked") and not k.startswith("layer6.")}
  elif layout == "reference":
    obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()},
           "optimizer": {"state": {}, "param_groups": [{"lr": 2.5e-4, "momentum": 0.9}]},
           "epoch": 3, "iteration": 1000, "best_MIou": np.float64(0.42)}
  elif layout == "bare":
    obj = sd
  elif layout == "torchvision":
    obj = vgg_reference_to_torchvision(sd)
  else:
    raise ValueError(layout)
  torch.save(obj, path)
  return path
