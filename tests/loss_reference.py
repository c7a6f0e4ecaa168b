"""A plain loop-over-classes transcription of the losses in torch, for tests only.

Written from the formulas in docs/LOSSES.md (not from the authors' code): boolean masks, Python
loops over classes and `torch.norm`, i.e. the straightforward way, so that udajax.losses (one-hot,
masked, jit-friendly) can be checked against it, values and gradients. Inputs are NHWC like
udajax; computations run in the dtype of the inputs (tests use float64).
"""

import torch
import torch.nn.functional as F


def _nchw(x):
  return x.permute(0, 3, 1, 2)


def assign_bilinear(prob, hw):
  """prob (B, H, W, C) -> (B*h*w,) class of each feature position (align_corners bilinear)."""
  small = F.interpolate(_nchw(prob), size=hw, mode="bilinear", align_corners=True)
  return small.argmax(dim=1).reshape(-1)


def assign_nearest(prob, hw):
  """Argmax at full size, then PyTorch-nearest downsampling."""
  full = prob.argmax(dim=-1).to(prob.dtype)[:, None]
  return F.interpolate(full, size=hw, mode="nearest")[:, 0].reshape(-1).long()


def assign_labels(labels, hw):
  small = F.interpolate(labels[:, None].double(), size=hw, mode="nearest")[:, 0]
  return small.reshape(-1).long()


def centroids_of(src_x, src_a, tgt_x, tgt_a, num_classes):
  """List of C centroids (None for absent classes): mean of source+target features of class j."""
  out = []
  for j in range(num_classes):
    members = torch.cat([src_x[src_a == j], tgt_x[tgt_a == j]], dim=0)
    out.append(members.mean(dim=0) if members.shape[0] > 0 else None)
  return out


def smooth(current, state, alpha):
  """Centroid smoothing on lists: c <- alpha c + (1 - alpha) c_prev; absent classes keep c_prev.

  state: list of previous centroids (None = never seen). Returns (smoothed list, new state).
  """
  out = []
  for c, prev in zip(current, state):
    if c is None:
      out.append(prev)
    elif prev is None:
      out.append(alpha * c + (1 - alpha) * c.detach())
    else:
      out.append(alpha * c + (1 - alpha) * prev)
  return out, [None if c is None else c.detach() for c in out]


def d(x, p):
  return torch.norm(x, p=p) / x.numel()


def f_dist(x, a, cents, p):
  terms = []
  for j, c in enumerate(cents):
    if c is None:
      continue
    members = x[a == j]
    if members.shape[0] == 0:
      continue
    terms.append(d(c[None, :] - members, p))
  return torch.stack(terms).mean() if terms else torch.zeros((), dtype=x.dtype)


def c_dist(cents, p, dtype):
  present = [j for j, c in enumerate(cents) if c is not None]
  if len(present) < 2:
    return torch.zeros((), dtype=dtype)
  terms = []
  for i in present:
    others = torch.stack([cents[k] for k in present if k != i])
    terms.append(d(cents[i][None, :] - others, p))
  return torch.stack(terms).mean()


def ortho(src_x, tgt_x, cents, temperature):
  cs = torch.stack([c for c in cents if c is not None])
  z = torch.cat([src_x, tgt_x], dim=0) @ cs.t() / temperature
  return -(F.softmax(z, dim=1) * F.log_softmax(z, dim=1)).mean()


def sparse(cents, rho, power):
  cs = torch.stack([c for c in cents if c is not None])
  normed = cs / cs.max(dim=-1, keepdim=True).values
  term = (normed - rho) ** int(power)
  if power % 2 != 0:
    term = term.abs()
  return -term.mean()


def feature_regularization(source_feat, source_prob, target_feat, target_prob, *, num_classes,
                           cluster_norm_order=1, ortho_temperature=1.0, sparsity_rho=0.5,
                           sparsity_power=2.0, source_labels=None, centroid_smoothing=None,
                           state=None):
  """Returns (dict of the five terms, new state list or None)."""
  hs, ht = tuple(source_feat.shape[1:3]), tuple(target_feat.shape[1:3])
  sx = source_feat.reshape(-1, source_feat.shape[-1])
  tx = target_feat.reshape(-1, target_feat.shape[-1])
  if centroid_smoothing is not None and state is None:
    state = [None] * num_classes

  def get_centroids(sa, ta, state):
    cents = centroids_of(sx, sa, tx, ta, num_classes)
    if centroid_smoothing is not None:
      cents, state = smooth(cents, state, centroid_smoothing)
    return cents, state

  sa = assign_labels(source_labels, hs) if source_labels is not None else assign_bilinear(
      source_prob, hs)
  ta = assign_bilinear(target_prob, ht)
  cents, state = get_centroids(sa, ta, state)
  p = cluster_norm_order
  out = {"c_dist": c_dist(cents, p, sx.dtype), "f_dist_source": f_dist(sx, sa, cents, p),
         "f_dist_target": f_dist(tx, ta, cents, p)}
  if source_labels is None:
    sa = assign_nearest(source_prob, hs)
  ta = assign_nearest(target_prob, ht)
  cents, state = get_centroids(sa, ta, state)
  out["ortho_loss"] = ortho(sx, tx, cents, ortho_temperature)
  out["sparse_loss"] = sparse(cents, sparsity_rho, sparsity_power)
  return out, state


def iw_max_square_loss(prob, ratio):
  """prob (B, H, W, C): loop over images, histogram of argmax, weights, -sum w p^2 / (B C)."""
  batch, num_classes = prob.shape[0], prob.shape[-1]
  total = 0
  for b in range(batch):
    arg = prob[b].argmax(dim=-1)
    hist = torch.bincount(arg.reshape(-1), minlength=num_classes).to(prob.dtype)
    w = 1.0 / torch.clamp(hist ** ratio * hist.sum() ** (1 - ratio), min=1.0)
    total = total + (w[arg][..., None] * prob[b] ** 2).sum()
  return -total / (batch * num_classes)


def cross_entropy(logits, labels):
  num_classes = logits.shape[-1]
  valid = (labels >= 0) & (labels < num_classes)
  if not bool(valid.any()):
    return torch.zeros((), dtype=logits.dtype)
  return F.cross_entropy(logits[valid], labels[valid].long())
