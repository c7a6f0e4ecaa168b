"""Whole UDA training steps of udajax against the authors' training step, from the same weights.

    python benchmarks/compare_reference_training.py --reference_dir=/tmp/ref/UDAclustering \
        [--steps=4] [--config=configs/gta.py] [--config.train.optimizer=sgd] [--installed_torch]

What runs, from one random initialisation (the authors' ResNet-101 init: conv weights N(0, 0.01),
BN scale 1 and bias 0, then each bottleneck's last BN scale drawn from U(0, 0.05) as trained
ResNets have small residual branches) and the same random batches (--source_size and
--target_size crops, batch 1 per domain):

- **theirs**: the authors' `DeeplabFeat` (their `graphs/models/DeepLabV2_feat.py`) and their loss
  modules (`utils/losses.py`), one step as their `tools/train_UDA.py` runs it: poly lr set on both
  parameter groups, source forward, cross-entropy `backward(retain_graph=True)`, target forward,
  then EM, clustering, orthogonality and sparsity terms each with its own `backward()`, then
  `optimizer.step(); optimizer.zero_grad()`. The optimiser gets their `optim_parameters` groups
  *with* their duplicates and is stepped with a transcription of torch 1.0.0's `SGD.step`
  (`tests/torch10_sgd.py`, the version their code pins). With `--config.train.optimizer=sgd`
  the groups are de-duplicated first (each tensor listed once: the textbook SGD).
- **ours**: `udajax.train_step.make_p_train_step` with the config's optimiser, on one device.
- `--float64_reference` also steps a float64 copy of theirs (same groups, the same torch-1.0
  transcription) and measures ours and theirs, both float32, against it: how close each float32
  implementation is to the exact trajectory.
- `--installed_torch` also steps a third copy of their model with the installed torch's own
  `torch.optim.SGD` on their groups with duplicates (for information: torch >= 1.1 adds weight
  decay out of place, a different trajectory from torch 1.0's).

The weights of theirs are converted with `data_prep/convert_torch_checkpoint.py` for ours.
Defaults make float32 rounding small against the differences looked for: lr 1e-3 (SGD is linear
in lr) with the poly schedule over 8 steps; the paper config's lambdas.

Prints every loss term per step side by side, the update-size ratio ours/theirs per group of
tensors (by how often the authors list them: 1x, 3x, 4x backbone; head), and last one JSON line:
worst per-leaf update error (max |update ours - update theirs| / max |update theirs| over the
whole run, worst leaf; also the worst over the leaves whose update is resolved in float32, see
`update_report`), the worst loss-term relative error, and the worst BN running-statistics
relative error. Needs PyTorch and a checkout of LTTM/UDAclustering (kept outside this
repository). Bad flags give one `error: ...` line and exit status 2.
"""

import copy
import importlib
import os
import sys
import types

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.common import cpu_name, emit_json, reference_loss_classes  # noqa: E402
from data_prep.convert_torch_checkpoint import convert_state_dict  # noqa: E402
from udajax import optim  # noqa: E402
from udajax import train_step as ts  # noqa: E402
from udajax.cli import fail  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gta.py", "config file (configs/*.py)",
                                          lock_config=True)
_REFERENCE_DIR = flags.DEFINE_string("reference_dir", None,
                                     "checkout of LTTM/UDAclustering (kept outside this repo)")
_STEPS = flags.DEFINE_integer("steps", 4, "training steps compared")
_LR = flags.DEFINE_float("lr", 1e-3, "base lr (replaces train.lr)")
_POLY_STEPS = flags.DEFINE_integer("poly_steps", 8, "length of the poly schedule (train.num_steps)")
_SOURCE_SIZE = flags.DEFINE_string("source_size", "97,161", "source crop H,W")
_TARGET_SIZE = flags.DEFINE_string("target_size", "81,129", "target crop H,W")
_SEED = flags.DEFINE_integer("seed", 0, "init and batches")
_INSTALLED_TORCH = flags.DEFINE_bool("installed_torch", False,
                                     "also step the installed torch's own SGD (information)")
_FLOAT64 = flags.DEFINE_bool(
    "float64_reference", False, "also step a float64 copy of their model and optimizer and "
    "measure both float32 runs (ours, theirs) against it")
_OUTPUT = flags.DEFINE_string("output", None, "append the JSON line to this file")

TERMS = ("ce", "em", "clustering", "orthogonality", "sparsity")


def _size(flag):
  try:
    h, w = (int(v) for v in flag.value.split(","))
  except ValueError:
    fail(f"--{flag.name}={flag.value!r}: expected H,W (two integers)")
  return h, w


def reference_modules(ref_dir):
  """(DeeplabFeat, feature-regularisation loss class, IW loss class) of the authors' code."""
  if not os.path.exists(os.path.join(ref_dir, "graphs", "models", "DeepLabV2_feat.py")):
    fail(f"--reference_dir: no graphs/models/DeepLabV2_feat.py under {ref_dir} "
         "(clone LTTM/UDAclustering there)")
  try:
    importlib.import_module("torchvision")
  except ImportError:  # their module imports torchvision.models; their ResNet never uses it
    sys.modules["torchvision"] = types.SimpleNamespace(models=None)
  sys.path.insert(0, ref_dir)
  feat_mod = importlib.import_module("graphs.models.DeepLabV2_feat")
  return (feat_mod.DeeplabFeat,) + reference_loss_classes(ref_dir)


def make_reference_model(deeplab_feat, num_classes, seed):
  """Their DeepLab-v2 ResNet-101 with their init and small last-BN scales (see the docstring)."""
  import torch
  torch.manual_seed(seed)
  model = deeplab_feat(num_classes, "ResNet101", pretrained=False)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, module in model.named_modules():
      if name.endswith("bn3"):
        module.weight.copy_(torch.rand(module.weight.shape, generator=g) * 0.05)
  return model.train()


def reference_groups(model, lr, dedup):
  """Their optim_parameters groups as lists (duplicates kept unless `dedup`)."""
  groups = [{"params": list(g["params"]), "lr": g["lr"]}
            for g in model.optim_parameters(types.SimpleNamespace(lr=lr))]
  if dedup:
    for g in groups:
      seen, unique = set(), []
      for p in g["params"]:
        if id(p) not in seen:
          seen.add(id(p))
          unique.append(p)
      g["params"] = unique
  return groups


def reference_step(model, optimizer, batch, losses_, config, lr):
  """One step of their train_UDA.py loop; returns the unweighted loss terms."""
  import torch
  import torch.nn.functional as F  # pylint: disable=invalid-name
  ce, iw, reg = losses_
  lc = config.loss
  optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = lr, 10 * lr
  xs, ys, xt = batch
  pred_s, feat_s = model(xs)
  loss = ce(pred_s, ys)
  loss.backward(retain_graph=True)
  pred_t, feat_t = model(xt)
  em = iw(pred_t, F.softmax(pred_t, dim=1))
  (lc.lambda_em * em).backward(retain_graph=True)
  out = reg(source_prob=F.softmax(pred_s, dim=1), target_prob=F.softmax(pred_t, dim=1),
            source_feat=feat_s, target_feat=feat_t, smo_coeff=lc.centroid_smoothing,
            clustering_params={"norm_order": lc.cluster_norm_order},
            orthogonality_params={"temp": lc.ortho_temperature},
            sparsity_params={"norm_order": lc.sparsity_power, "rho": lc.sparsity_rho})
  cluster = out["f_dist_source"] + out["f_dist_target"] - out["c_dist"]
  (lc.lambda_cl * cluster).backward(retain_graph=True)
  (lc.lambda_or * out["ortho_loss"]).backward(retain_graph=True)
  (lc.lambda_sp * out["sparse_loss"]).backward()
  optimizer.step()
  optimizer.zero_grad()
  with torch.no_grad():
    return {"ce": loss.item(), "em": em.item(), "clustering": cluster.item(),
            "orthogonality": out["ortho_loss"].item(), "sparsity": out["sparse_loss"].item()}


def to_udajax(model, config):
  """{"params", "batch_stats"} of a torch model, through the checkpoint converter."""
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  variables, _ = convert_state_dict(sd, "resnet101", num_classes=config.num_classes,
                                    aspp_branches=len(config.model.aspp_dilations))
  return variables


def to_udajax64(model, config):
  """`to_udajax` in float64: the converter works in float32, so the float64 values are split
  into two float32 parts (hi + lo, each exact), converted separately (transposes and reshapes
  only) and summed again in float64."""
  sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()
        if v.is_floating_point()}
  hi = {k: v.astype(np.float32) for k, v in sd.items()}
  lo = {k: (v - hi[k]).astype(np.float32) for k, v in sd.items()}
  kw = dict(num_classes=config.num_classes, aspp_branches=len(config.model.aspp_dilations))
  vh, _ = convert_state_dict(hi, "resnet101", **kw)
  vl, _ = convert_state_dict(lo, "resnet101", **kw)
  return jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) + np.asarray(b, np.float64),
                                vh, vl)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


RESOLVED_ULPS = 1000


def update_report(initial, ours, theirs, entries):
  """Per-leaf update errors and, per entry-count group, the norm ratio ours / theirs.

  A leaf's error is max |update ours - update theirs| / max |update theirs|. Both sides store
  float32 parameters, so an update is only resolved to one float32 spacing (ulp) of the
  parameter's value: a BN scale near 1 moved by 7 ulps shows an error of 1/7 from a one-ulp
  difference. "Resolved" leaves are those whose largest update is at least RESOLVED_ULPS ulps of
  the leaf's largest |value| (their error is at most 1e-3 from the storage alone).

  Returns (worst, worst leaf, median, ratios, worst over resolved leaves, its leaf, number of
  unresolved leaves).
  """
  p0, a, b, k = _flat(initial), _flat(ours), _flat(theirs), _flat(entries)
  worst, worst_leaf, errs = 0.0, "", []
  worst_res, worst_res_leaf, unresolved = 0.0, "", 0
  sums = {}
  for key in p0:
    da, db = a[key] - p0[key], b[key] - p0[key]
    scale = np.max(np.abs(db))
    if scale == 0:
      if np.max(np.abs(da)) > 0:
        worst, worst_leaf = float("inf"), key
      continue
    err = float(np.max(np.abs(da - db)) / scale)
    errs.append(err)
    if err > worst:
      worst, worst_leaf = err, key
    if scale >= RESOLVED_ULPS * float(np.spacing(np.float32(np.max(np.abs(p0[key]))))):
      if err > worst_res:
        worst_res, worst_res_leaf = err, key
    else:
      unresolved += 1
    group = "head" if key.startswith("['classifier']") else f"{int(k[key])}x backbone"
    s = sums.setdefault(group, [0.0, 0.0])
    s[0] += float(np.sum(da ** 2))
    s[1] += float(np.sum(db ** 2))
  ratios = {g: (s[0] / s[1]) ** 0.5 for g, s in sorted(sums.items())}
  return (worst, worst_leaf, float(np.median(errs)), ratios, worst_res, worst_res_leaf,
          unresolved)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  if not _REFERENCE_DIR.value:
    fail("--reference_dir is required (a checkout of LTTM/UDAclustering)")
  config = _CONFIG.value
  if config.model.backbone != "resnet101" or tuple(config.model.stage_blocks) != (3, 4, 23, 3):
    fail("the comparison runs the authors' full ResNet-101: use configs/gta.py or "
         "configs/synthia.py without model overrides")
  if config.train.mode != "uda":
    fail("the comparison runs the authors' UDA step: use a UDA config")
  import torch

  deeplab_feat, feature_loss_cls, iw_loss_cls = reference_modules(
      os.path.abspath(_REFERENCE_DIR.value))
  with config.unlocked():
    config.train.lr, config.train.num_steps = _LR.value, _POLY_STEPS.value
    config.source.image_size, config.target.image_size = _size(_SOURCE_SIZE), _size(_TARGET_SIZE)
    config.init_checkpoint = ""
  dedup = config.train.optimizer == "sgd"

  theirs = make_reference_model(deeplab_feat, config.num_classes, _SEED.value)
  initial = to_udajax(theirs, config)
  installed = copy.deepcopy(theirs) if _INSTALLED_TORCH.value else None
  from tests.torch10_sgd import Torch10SGD
  t = config.train
  opt = Torch10SGD(reference_groups(theirs, t.lr, dedup), momentum=t.momentum,
                   weight_decay=t.weight_decay)
  exact = copy.deepcopy(theirs).double() if _FLOAT64.value else None
  opt_exact = (Torch10SGD(reference_groups(exact, t.lr, dedup), momentum=t.momentum,
                          weight_decay=t.weight_decay) if exact is not None else None)
  opt_installed = None
  if installed is not None:
    import warnings
    warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
    opt_installed = torch.optim.SGD(reference_groups(installed, t.lr, dedup), lr=t.lr,
                                    momentum=t.momentum, weight_decay=t.weight_decay)
  lc = config.loss
  losses_ = (torch.nn.CrossEntropyLoss(ignore_index=-1),
             iw_loss_cls(ignore_index=-1, num_class=config.num_classes, ratio=lc.iw_ratio),
             feature_loss_cls(ignore_index=-1, num_class=config.num_classes, device="cpu"))

  devices = jax.local_devices()[:1]
  state = ts.create_train_state(config, initial, jax.random.PRNGKey(1))
  state = ts.replicate(state, devices)
  p_step = ts.make_p_train_step(config, devices=devices, donate=False)
  _, schedule = ts.create_optimizer(config)

  rng = np.random.default_rng(_SEED.value)
  hs, ws = config.source.image_size
  ht, wt = config.target.image_size
  print(f"udajax vs the authors' step: ResNet-101, {config.train.optimizer} "
        f"({'their groups de-duplicated' if dedup else 'their groups with duplicates'}, "
        f"torch-1.0 SGD transcription), lr {t.lr} poly over {t.num_steps} steps, "
        f"source {hs}x{ws}, target {ht}x{wt}; {cpu_name()}, torch {torch.__version__}")
  print(f"{'step':>4} {'term':>14} {'udajax':>14} {'theirs':>14} {'rel. error':>11}"
        + (f" {'installed torch':>16}" if installed is not None else ""))
  worst_term = 0.0
  for i in range(_STEPS.value):
    xs = rng.normal(0, 50, size=(1, hs, ws, 3)).astype(np.float32)
    xt = rng.normal(0, 50, size=(1, ht, wt, 3)).astype(np.float32)
    ys = rng.integers(0, config.num_classes, size=(1, hs, ws)).astype(np.int32)
    batch = {"source_image": xs[None], "source_label": ys[None], "target_image": xt[None]}
    state, metrics = p_step(state, batch)
    metrics = jax.device_get(metrics)
    lr = float(schedule(i))
    tb = (torch.from_numpy(xs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ys).long(),
          torch.from_numpy(xt).permute(0, 3, 1, 2).contiguous())
    ref_terms = reference_step(theirs, opt, tb, losses_, config, lr)
    if exact is not None:
      reference_step(exact, opt_exact, (tb[0].double(), tb[1], tb[2].double()), losses_, config,
                     lr)
    inst_terms = (reference_step(installed, opt_installed, tb, losses_, config, lr)
                  if installed is not None else None)
    for name in TERMS:
      ours_v, ref_v = float(metrics[name][0]), ref_terms[name]
      err = abs(ours_v - ref_v) / max(abs(ref_v), 1e-12)
      worst_term = max(worst_term, err)
      line = f"{i + 1:>4} {name:>14} {ours_v:>14.7g} {ref_v:>14.7g} {err:>11.2e}"
      if inst_terms is not None:
        line += f" {inst_terms[name]:>16.7g}"
      print(line)

  ours = ts.unreplicate(state)
  final = to_udajax(theirs, config)
  entries = optim.entries_per_tensor(initial["params"])
  worst, worst_leaf, median, ratios, worst_res, worst_res_leaf, unresolved = update_report(
      initial["params"], ours.params, final["params"], entries)
  print("update size ratio udajax / theirs (norm of the change over the run), per group:")
  for group, r in ratios.items():
    print(f"  {group:>12}: {r:.6f}")
  if installed is not None:
    _, _, _, inst, *_ = update_report(initial["params"], to_udajax(installed, config)["params"],
                                  final["params"], entries)
    print(f"installed torch {torch.__version__} SGD / torch-1.0 transcription, per group:")
    for group, r in inst.items():
      print(f"  {group:>12}: {r:.4f}")
  print(f"per-leaf update error: worst {worst:.3g} ({worst_leaf}), median {median:.3g}; over "
        f"the leaves resolved in float32 (update >= {RESOLVED_ULPS} ulps of the value): worst "
        f"{worst_res:.3g} ({worst_res_leaf}), {unresolved} leaves not resolved")
  result_64 = {}
  if exact is not None:
    e64 = to_udajax64(exact, config)["params"]
    for who, tree in (("udajax float32", ours.params), ("theirs float32", final["params"])):
      w, wl, med, _, wr, wrl, unres = update_report(initial["params"], tree, e64, entries)
      print(f"{who} vs theirs float64: per-leaf update error worst {w:.3g} ({wl}), median "
            f"{med:.3g}; resolved leaves worst {wr:.3g} ({wrl})")
      result_64[who.split()[0]] = {"worst": w, "worst_leaf": wl, "median": med,
                                   "worst_resolved": wr, "worst_resolved_leaf": wrl}
  bn = _flat(final["batch_stats"])
  bn_ours = _flat(ours.batch_stats)
  bn_err = max(float(np.max(np.abs(bn_ours[k] - v)) / max(np.max(np.abs(v)), 1e-12))
               for k, v in bn.items())
  result = {"optimizer": config.train.optimizer, "reference_groups":
            "deduplicated" if dedup else "with duplicates", "steps": _STEPS.value,
            "lr": t.lr, "poly_steps": t.num_steps, "source_size": [hs, ws],
            "target_size": [ht, wt], "worst_update_error": worst, "worst_update_leaf": worst_leaf,
            "median_update_error": median, "worst_resolved_update_error": worst_res,
            "worst_resolved_leaf": worst_res_leaf, "unresolved_leaves": unresolved,
            "leaves": len(jax.tree_util.tree_leaves(entries)), "worst_loss_term_error": worst_term,
            "bn_stats_error": bn_err, "update_ratio": ratios, "cpu": cpu_name(),
            "torch": torch.__version__, "jax": jax.__version__}
  if result_64:
    result["against_float64_reference"] = result_64
  emit_json(result, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
