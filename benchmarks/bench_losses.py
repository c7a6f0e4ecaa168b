"""Times udajax's feature regularisation + IW max-square loss, forward and backward.

At the paper's shapes (GTA5 -> Cityscapes, DeepLab-v2 ResNet-101, batch 1 per domain): source
features 1x90x160x2048 and probabilities 1x720x1280x19, target 1x64x128x2048 and 1x512x1024x19.
Ours: one jitted value_and_grad of
  0.02 (f_dist_s + f_dist_t - c_dist) + 2 ortho + 0.5 sparse + 0.1 IW
w.r.t. both feature maps and the target probabilities, timed after warm-up (median of
--repeats runs). With --reference_dir pointing at a checkout of the authors' code
(LTTM/UDAclustering, kept outside this repository), their PyTorch loss module is imported from
there and timed on the same inputs, same machine, same process (forward + one backward of the
same weighted sum); the loss values of both are printed side by side as a sanity check.

  python benchmarks/bench_losses.py --reference_dir=/tmp/ref/UDAclustering

Runs are interleaved in --rounds rounds (ours, then reference) so that a load change on a
shared machine hits both.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from udajax import losses  # noqa: E402
from benchmarks.common import cpu_name, reference_loss_classes  # noqa: E402

LAMBDA_CL, LAMBDA_OR, LAMBDA_SP, LAMBDA_EM, IW_RATIO = 2e-2, 2.0, 0.5, 0.1, 0.2
KEYS = ("c_dist", "f_dist_source", "f_dist_target", "ortho_loss", "sparse_loss")


def make_inputs(args):
  rng = np.random.default_rng(0)
  c, fdim = args.num_classes, args.feat_dim

  def probs(shape):
    # Spatially smooth random logits (blocks of 8x8 pixels plus noise): segment-like maps.
    coarse = rng.normal(size=(1, shape[0] // 8 + 1, shape[1] // 8 + 1, c)).astype(np.float32)
    logits = 3 * np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :shape[0], :shape[1]]
    logits += rng.normal(size=logits.shape).astype(np.float32)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)

  def feats(shape):
    return np.maximum(rng.normal(size=(1,) + shape + (fdim,)), 0).astype(np.float32)

  return (feats(args.source_feat_hw), probs(args.source_hw), feats(args.target_feat_hw),
          probs(args.target_hw))


def ours(args, sf, sp, tf, tp):
  def total(sf, tf, tp, sp):  # sp is an argument: a closed-over array would be constant-folded
    out = losses.feature_regularization(sf, sp, tf, tp, num_classes=args.num_classes,
                                        cluster_norm_order=args.cluster_norm_order)
    em = losses.iw_max_square_loss(tp, IW_RATIO)
    loss = (LAMBDA_CL * (out["f_dist_source"] + out["f_dist_target"] - out["c_dist"])
            + LAMBDA_OR * out["ortho_loss"] + LAMBDA_SP * out["sparse_loss"] + LAMBDA_EM * em)
    return loss, dict(out, em=em)

  step = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))
  inputs = [jax.device_put(x) for x in (sf, tf, tp, sp)]
  t0 = time.perf_counter()
  jax.block_until_ready(step(*inputs))
  compile_s = time.perf_counter() - t0

  def run():
    t = time.perf_counter()
    (_, aux), grads = step(*inputs)
    jax.block_until_ready(grads)
    return time.perf_counter() - t, {k: float(v) for k, v in aux.items()}
  for _ in range(args.warmup):
    run()
  return run, compile_s


def reference(args, sf, sp, tf, tp):
  import torch  # only the comparison needs torch

  try:
    reg_cls, iw_cls = reference_loss_classes(args.reference_dir)
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from e
  reg = reg_cls(num_class=args.num_classes, device="cpu")
  iw = iw_cls(num_class=args.num_classes, ratio=IW_RATIO)
  nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # noqa: E731
  sft, spt, tft, tpt = nchw(sf), nchw(sp), nchw(tf), nchw(tp)
  kwargs = dict(smo_coeff=-1, clustering_params={"norm_order": args.cluster_norm_order},
                orthogonality_params={"temp": 1.0},
                sparsity_params={"norm_order": 2.0, "rho": 0.5})

  def run():
    leaves = [x.detach().clone().requires_grad_() for x in (sft, tft, tpt)]
    t = time.perf_counter()
    out = reg(source_feat=leaves[0], source_prob=spt, target_feat=leaves[1],
              target_prob=leaves[2], **kwargs)
    em = iw(leaves[2], leaves[2])
    loss = (LAMBDA_CL * (out["f_dist_source"] + out["f_dist_target"] - out["c_dist"])
            + LAMBDA_OR * out["ortho_loss"] + LAMBDA_SP * out["sparse_loss"] + LAMBDA_EM * em)
    loss.backward()
    elapsed = time.perf_counter() - t
    return elapsed, dict({k: out[k].item() for k in KEYS}, em=em.item())
  for _ in range(args.warmup):
    run()
  return run, torch.get_num_threads(), torch.__version__


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference_dir", default=None,
                      help="checkout of LTTM/UDAclustering (outside this repo); omit to skip")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per round")
  parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds ours/reference")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--cluster_norm_order", type=int, default=1)
  parser.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
  args = parser.parse_args()
  args.num_classes, args.feat_dim = 19, 2048
  args.source_feat_hw, args.source_hw = (90, 160), (720, 1280)
  args.target_feat_hw, args.target_hw = (64, 128), (512, 1024)
  if args.small:
    args.feat_dim = 64
    args.source_feat_hw, args.source_hw = (12, 20), (90, 160)
    args.target_feat_hw, args.target_hw = (8, 16), (64, 128)

  print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}")
  print(f"shapes: source feat 1x{args.source_feat_hw[0]}x{args.source_feat_hw[1]}x{args.feat_dim}, "
        f"prob 1x{args.source_hw[0]}x{args.source_hw[1]}x{args.num_classes}; target feat "
        f"1x{args.target_feat_hw[0]}x{args.target_feat_hw[1]}x{args.feat_dim}, prob "
        f"1x{args.target_hw[0]}x{args.target_hw[1]}x{args.num_classes}; norm order "
        f"{args.cluster_norm_order}")
  sf, sp, tf, tp = make_inputs(args)
  run_ours, compile_s = ours(args, sf, sp, tf, tp)
  print(f"udajax: compiled (incl. first run) in {compile_s:.1f} s")
  run_ref = None
  if args.reference_dir:
    run_ref, threads, torch_version = reference(args, sf, sp, tf, tp)
    print(f"reference: torch {torch_version}, {threads} threads")
  else:
    print("reference: skipped (pass --reference_dir=/path/to/UDAclustering to time it)")

  times_ours, times_ref = [], []
  for _ in range(args.rounds):
    for _ in range(args.repeats):
      t, vals_ours = run_ours()
      times_ours.append(t)
    if run_ref is not None:
      for _ in range(args.repeats):
        t, vals_ref = run_ref()
        times_ref.append(t)

  def summary(ts):
    return (f"median {statistics.median(ts) * 1e3:.0f} ms (min {min(ts) * 1e3:.0f}, "
            f"max {max(ts) * 1e3:.0f}, n={len(ts)})")
  print(f"udajax    fwd+bwd: {summary(times_ours)}")
  if run_ref is not None:
    print(f"reference fwd+bwd: {summary(times_ref)}")
    print(f"speed-up (median): {statistics.median(times_ref) / statistics.median(times_ours):.1f}x")
    print("values (udajax | reference | rel. diff):")
    for k in vals_ours:
      diff = abs(vals_ours[k] - vals_ref[k]) / max(abs(vals_ref[k]), 1e-30)
      print(f"  {k:14s} {vals_ours[k]: .7g} | {vals_ref[k]: .7g} | {diff:.1e}")
  else:
    print("values:", {k: round(v, 7) for k, v in vals_ours.items()})


if __name__ == "__main__":
  main()
