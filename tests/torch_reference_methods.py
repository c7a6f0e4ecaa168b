"""PyTorch transcriptions of the baselines' code, for tests/test_methods.py.

* `entropy_loss`: ADVENT (Vu et al., CVPR 2019), advent/utils/func.py `entropy_loss`;
* `FCDiscriminator` and the BCE losses: AdaptSegNet (Tsai et al., CVPR 2018),
  model/discriminator.py and train_gta2cityscapes_multi.py (BCEWithLogitsLoss, source label 0,
  target label 1, the discriminator's two halves each divided by 2).
Transcribed for testing only (NCHW, as the originals).
"""

import numpy as np
import torch
from torch import nn


def entropy_loss(prob):
  """(N, C, H, W) softmax -> scalar: -sum p log2(p + 1e-30) / (N H W log2 C)."""
  n, c, h, w = prob.size()
  return -torch.sum(torch.mul(prob, torch.log2(prob + 1e-30))) / (n * h * w * np.log2(c))


class FCDiscriminator(nn.Module):

  def __init__(self, in_channels, ndf=64):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1)
    self.conv2 = nn.Conv2d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1)
    self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, kernel_size=4, stride=2, padding=1)
    self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, kernel_size=4, stride=2, padding=1)
    self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2, padding=1)
    self.leaky_relu = nn.LeakyReLU(negative_slope=0.2)

  def forward(self, x):
    x = self.leaky_relu(self.conv1(x))
    x = self.leaky_relu(self.conv2(x))
    x = self.leaky_relu(self.conv3(x))
    x = self.leaky_relu(self.conv4(x))
    return self.classifier(x)

  def load_flax(self, params):
    """Copies udajax FCDiscriminator params (HWIO kernels) into this module (OIHW)."""
    names = ["conv1", "conv2", "conv3", "conv4", "classifier"]
    with torch.no_grad():
      for i, name in enumerate(names):
        p = params[f"conv{i + 1}"]
        conv = getattr(self, name)
        conv.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.asarray(p["bias"]).copy()))


def adversarial_loss(model_d, target_feat):
  """The segmenter's term: BCE(D(f_t), source label 0)."""
  out = model_d(target_feat)
  return nn.BCEWithLogitsLoss()(out, torch.zeros_like(out))


def discriminator_loss(model_d, source_feat, target_feat):
  """D's loss on detached features: BCE(D(f_s), 0) / 2 + BCE(D(f_t), 1) / 2."""
  bce = nn.BCEWithLogitsLoss()
  out_s = model_d(source_feat.detach())
  out_t = model_d(target_feat.detach())
  return bce(out_s, torch.zeros_like(out_s)) / 2 + bce(out_t, torch.ones_like(out_t)) / 2
