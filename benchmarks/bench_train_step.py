"""Times and sizes udajax's own pmapped UDA train step for any config, on random inputs.

What runs: `train_step.create_train_state` + `train_step.make_p_train_step` on one device with the
config's model (backbone, depth, dtype, remat, sync BN), losses and optimiser; inputs are random
images and labels at the config's crop sizes (`source.image_size`, `target.image_size`) and
`train.batch_size_per_device` images per domain; no dataset is read.

  python benchmarks/bench_train_step.py --config=configs/gta.py \
      [--config.model.remat=True] [--config.model.dtype=bfloat16] \
      [--config.source.image_size="(128, 256)" --config.target.image_size="(128, 256)"] \
      [--memory_only] [--reference_dir=/tmp/ref/UDAclustering] [--output=/tmp/bench.jsonl]

Per setting it prints a few human-readable lines and, last, one JSON object (also appended to
--output) with: backbone, dtype, remat, sync_bn, batch, source_size, target_size, compile_s,
step_s (median of --steps runs after --warmup; null with --memory_only), steps_per_s,
images_per_s (source + target images per second), peak_memory_bytes (XLA: arguments + outputs +
temporaries - aliased donated buffers), the parts of that, flops (XLA cost analysis of one step),
matmul_peak_flops (a large jitted matmul in the compute dtype, timed on the same device in the
same run) and matmul_peak_fraction (flops / step_s / matmul_peak_flops).

--memory_only lowers and compiles the step ahead of time (`lower(...).compile()`) from abstract
shapes without running it, so the memory and FLOPs of the paper step can be read on a machine
too small to run it.

--reference_dir=DIR (a checkout of the authors' LTTM/UDAclustering code, kept outside this
repository) also times their PyTorch UDA step at the same shapes: their DeepLab-v2 (`DeeplabFeat`)
forward on source and target, cross-entropy, IW max-square, their feature regularisation, one
backward of the weighted sum of all terms (their `train_UDA.py` calls backward once per term,
5 passes through the network: `--per_term_backward`), SGD step with their two parameter groups.
Ours and theirs run alternately (--pairs pairs of --steps runs each); the ratio of the medians
(ours / reference time) is printed and recorded as `ratio_vs_reference`.
With --breakdown it then also times each model's train-mode forward + backward alone (both
domains, no losses, no update), alternating the same way, to show where a gap comes from.

Bad flags give one `error: ...` line and exit status 2.
"""

import importlib
import os
import statistics
import sys
import time
import types

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from udajax import train_step as ts  # noqa: E402
from udajax.cli import fail  # noqa: E402  (one `error: ...` line, exit status 2)
from benchmarks.common import cpu_name, emit_json, reference_loss_classes  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)",
                                          lock_config=True)
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False,
                                 "compile ahead of time (abstract inputs) without running")
_REFERENCE_DIR = flags.DEFINE_string("reference_dir", None,
                                     "checkout of LTTM/UDAclustering to time the reference step")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per round")
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed steps after compilation")
_PAIRS = flags.DEFINE_integer("pairs", 3, "alternating rounds ours / reference")
_PER_TERM_BACKWARD = flags.DEFINE_bool(
    "per_term_backward", False, "reference: one backward() per loss term, as their trainer "
    "does (slower) instead of one backward() of the weighted sum")
_OUTPUT = flags.DEFINE_string("output", None, "append the JSON line to this file")
_SEED = flags.DEFINE_integer("seed", 0, "random inputs and init")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "with --reference_dir: also time the model's forward + backward alone "
    "(both domains, no losses, no update) for both implementations")


def make_batch(config, rng):
  """Random batch with a leading device axis of 1: images (1, B, H, W, 3), labels (1, B, H, W)."""
  b = config.train.batch_size_per_device
  hs, ws = config.source.image_size
  batch = {
      "source_image": rng.normal(0, 50, size=(1, b, hs, ws, 3)).astype(np.float32),
      "source_label": rng.integers(0, config.num_classes, size=(1, b, hs, ws)).astype(np.int32),
  }
  if config.train.mode == "uda":
    ht, wt = config.target.image_size
    batch["target_image"] = rng.normal(0, 50, size=(1, b, ht, wt, 3)).astype(np.float32)
  return batch


def abstract_state(config):
  """The replicated TrainState as ShapeDtypeStructs (nothing is initialised)."""
  state = jax.eval_shape(lambda: ts.create_train_state(
      config, ts.init_variables(config, jax.random.PRNGKey(0)), jax.random.PRNGKey(1)))
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype), state)


def memory_stats(compiled):
  """XLA's memory analysis of a compiled step: dict of byte counts incl. the peak."""
  m = compiled.memory_analysis()
  if isinstance(m, (list, tuple)):
    m = m[0]
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "temp", "alias", "generated_code")}
  out["peak_memory_bytes"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def flops_of(compiled):
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0]
  return float(c.get("flops", float("nan"))) if c else float("nan")


def matmul_peak(dtype, n=2048, repeats=5):
  """Achieved FLOP/s of one jitted (n × n) @ (n × n) matmul in `dtype` on the default device."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a, a))
    times.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / min(times)


def compile_step(config, batch):
  """The pmapped step compiled on one device with a fresh state (seed --seed).

  Returns (compiled step, replicated state, replicated batch, compile seconds).
  """
  devices = jax.devices()[:1]
  p_step = ts.make_p_train_step(config, devices=devices, donate=True)
  variables = ts.init_variables(config, jax.random.PRNGKey(_SEED.value))
  state = flax.jax_utils.replicate(
      ts.create_train_state(config, variables, jax.random.PRNGKey(1)), devices)
  batch = flax.jax_utils.replicate(jax.tree_util.tree_map(lambda x: x[0], batch), devices)
  t0 = time.perf_counter()
  compiled = p_step.lower(state, batch).compile()
  return compiled, state, batch, time.perf_counter() - t0


def emit(result):
  """Prints the result as one JSON line, also appended to --output when given."""
  emit_json(result, _OUTPUT.value)


def build_ours(config, batch):
  """(run(), compile seconds, memory stats, flops); run is None with --memory_only."""
  if _MEMORY_ONLY.value:
    p_step = ts.make_p_train_step(config, devices=jax.devices()[:1], donate=True)
    state = abstract_state(config)
    batch_spec = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    t0 = time.perf_counter()
    compiled = p_step.lower(state, batch_spec).compile()
    return None, time.perf_counter() - t0, memory_stats(compiled), flops_of(compiled)

  compiled, state, batch, compile_s = compile_step(config, batch)
  holder = {"state": state}

  def run():
    t = time.perf_counter()
    holder["state"], m = compiled(holder["state"], batch)
    jax.block_until_ready((holder["state"], m))
    elapsed = time.perf_counter() - t
    return elapsed, {k: float(v[0]) for k, v in m.items()}

  return run, compile_s, memory_stats(compiled), flops_of(compiled)


def build_model_only(config, batch):
  """A run() timing our model's train-mode forward + backward on both domains, no losses."""
  model = ts.create_model(config, axis_name=None)
  variables = ts.init_variables(config, jax.random.PRNGKey(_SEED.value))
  images = [jnp.asarray(batch[k][0]) for k in ("source_image", "target_image")]

  def loss(params, batch_stats, xs, xt):
    total = 0.0
    for x in (xs, xt):
      (logits, feats), mutated = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                             train=True, mutable=["batch_stats"])
      batch_stats = mutated["batch_stats"]
      total = total + jnp.sum(logits) + jnp.sum(feats)
    return total

  grad = jax.jit(jax.grad(loss))
  args = (variables["params"], variables.get("batch_stats", {}), *images)
  jax.block_until_ready(grad(*args))

  def run():
    t = time.perf_counter()
    jax.block_until_ready(grad(*args))
    return time.perf_counter() - t

  return run


def build_reference(config, batch_np):
  """A run() timing one step of the authors' PyTorch UDA training loop at the same shapes."""
  import torch  # only the comparison needs torch
  import torch.nn.functional as F  # pylint: disable=invalid-name

  ref = os.path.abspath(_REFERENCE_DIR.value)
  if not os.path.exists(os.path.join(ref, "graphs", "models", "DeepLabV2_feat.py")):
    fail(f"--reference_dir: no graphs/models/DeepLabV2_feat.py under {ref} "
                         "(clone LTTM/UDAclustering there)")
  if config.train.mode != "uda":
    fail("--reference_dir times the reference's UDA step: use a UDA config")
  try:
    importlib.import_module("torchvision")
  except ImportError:
    if config.model.backbone != "resnet101":
      fail("--reference_dir with VGG-16 needs torchvision (the reference "
                           "builds its VGG from torchvision.models)")
    # The reference imports torchvision.models at module level but its ResNet never uses it.
    sys.modules["torchvision"] = types.SimpleNamespace(models=None)
  sys.path.insert(0, ref)
  feat_mod = importlib.import_module("graphs.models.DeepLabV2_feat")
  try:
    feature_loss_cls, iw_loss_cls = reference_loss_classes(ref)
  except FileNotFoundError as e:
    fail(str(e))
  if tuple(config.model.stage_blocks) != (3, 4, 23, 3) or config.model.base_width != 64:
    fail("--reference_dir needs the full-size model (stage_blocks (3, 4, 23, 3), "
                         "base_width 64)")
  backbone = {"resnet101": "ResNet101", "vgg16": "VGG16"}[config.model.backbone]
  torch.manual_seed(0)
  model = feat_mod.DeeplabFeat(config.num_classes, backbone, pretrained=False)
  model.train()
  t = config.train
  args = types.SimpleNamespace(lr=t.lr)
  optimizer = torch.optim.SGD(model.optim_parameters(args), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay)
  ce = torch.nn.CrossEntropyLoss(ignore_index=-1)
  lc = config.loss
  reg = feature_loss_cls(ignore_index=-1, num_class=config.num_classes, device="cpu")
  iw = iw_loss_cls(ignore_index=-1, num_class=config.num_classes, ratio=lc.iw_ratio)
  nchw = lambda x: torch.from_numpy(x[0]).permute(0, 3, 1, 2).contiguous()  # noqa: E731
  xs, xt = nchw(batch_np["source_image"]), nchw(batch_np["target_image"])
  ys = torch.from_numpy(batch_np["source_label"][0]).long()
  kwargs = {}
  if lc.lambda_cl > 0:
    kwargs["clustering_params"] = {"norm_order": lc.cluster_norm_order}
  if lc.lambda_or > 0:
    kwargs["orthogonality_params"] = {"temp": lc.ortho_temperature}
  if lc.lambda_sp > 0:
    kwargs["sparsity_params"] = {"norm_order": lc.sparsity_power, "rho": lc.sparsity_rho}

  def run():
    t0 = time.perf_counter()
    pred_s, feat_s = model(xs)
    loss = ce(pred_s, ys)
    pred_t, feat_t = model(xt)
    terms = [loss, lc.lambda_em * iw(pred_t, F.softmax(pred_t, dim=1))]
    out = reg(source_prob=F.softmax(pred_s, dim=1), target_prob=F.softmax(pred_t, dim=1),
              source_feat=feat_s, target_feat=feat_t, smo_coeff=-1, **kwargs)
    if lc.lambda_cl > 0:
      terms.append(lc.lambda_cl * (out["f_dist_source"] + out["f_dist_target"] - out["c_dist"]))
    if lc.lambda_or > 0:
      terms.append(lc.lambda_or * out["ortho_loss"])
    if lc.lambda_sp > 0:
      terms.append(lc.lambda_sp * out["sparse_loss"])
    if _PER_TERM_BACKWARD.value:  # as their train_UDA.py: one backward pass per loss term
      for i, term in enumerate(terms):
        term.backward(retain_graph=i + 1 < len(terms))
    else:  # the same gradient with one backward pass (the faster way to run their step)
      sum(terms).backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - t0, {"ce": loss.item()}

  def run_model_only():
    t0 = time.perf_counter()
    total = 0.0
    for x in (xs, xt):
      pred, feat = model(x)
      total = total + pred.sum() + feat.sum()
    total.backward()
    optimizer.zero_grad()
    return time.perf_counter() - t0

  return run, run_model_only, torch.get_num_threads(), torch.__version__


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    fail("--config is required, e.g. --config=configs/gta.py")
  if _MEMORY_ONLY.value and _REFERENCE_DIR.value:
    fail("--memory_only runs nothing: it cannot be combined with --reference_dir")
  if _BREAKDOWN.value and not _REFERENCE_DIR.value:
    fail("--breakdown compares with the reference: it needs --reference_dir")
  if min(_STEPS.value, _PAIRS.value) < 1 or _WARMUP.value < 0:
    fail("--steps and --pairs must be >= 1, --warmup >= 0")
  m = config.model
  dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); CPU: "
        f"{cpu_name()}, {os.cpu_count()} logical cores; jax {jax.__version__}")
  batch = make_batch(config, np.random.default_rng(_SEED.value))
  run, compile_s, mem, flops = build_ours(config, batch)
  gib = 2.0 ** 30
  print(f"udajax: compiled in {compile_s:.1f} s; XLA memory: arguments {mem['argument'] / gib:.2f}"
        f" GiB, outputs {mem['output'] / gib:.2f} GiB, temporaries {mem['temp'] / gib:.2f} GiB, "
        f"aliased {mem['alias'] / gib:.2f} GiB -> peak {mem['peak_memory_bytes'] / gib:.2f} GiB; "
        f"{flops / 1e12:.3f} TFLOP per step")
  b = config.train.batch_size_per_device
  images_per_step = b * (2 if config.train.mode == "uda" else 1)
  result = {
      "backbone": m.backbone, "dtype": m.dtype, "remat": bool(m.remat),
      "sync_bn": bool(m.sync_bn), "batch": b, "mode": config.train.mode,
      "stage_blocks": list(m.stage_blocks), "base_width": m.base_width,
      "source_size": list(config.source.image_size),
      "target_size": list(config.target.image_size) if config.train.mode == "uda" else None,
      "compile_s": round(compile_s, 3), "step_s": None, "steps_per_s": None,
      "images_per_s": None, "peak_memory_bytes": mem["peak_memory_bytes"],
      "argument_bytes": mem["argument"], "output_bytes": mem["output"],
      "temp_bytes": mem["temp"], "alias_bytes": mem["alias"], "flops": flops,
      "matmul_peak_flops": None, "matmul_peak_fraction": None,
      "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
  }
  run_ref = None
  if run is not None:
    if _REFERENCE_DIR.value:
      run_ref, run_ref_model, threads, torch_version = build_reference(config, batch)
      print(f"reference: torch {torch_version}, {threads} threads")
    for _ in range(_WARMUP.value):
      run()
      if run_ref is not None:
        run_ref()
    ours, theirs = [], []
    for _ in range(_PAIRS.value if run_ref is not None else 1):
      for _ in range(_STEPS.value):
        ours.append(run()[0])
      if run_ref is not None:
        for _ in range(_STEPS.value):
          theirs.append(run_ref()[0])
    step_s = statistics.median(ours)
    peak = matmul_peak(dtype)
    fmt = lambda xs: (f"median {statistics.median(xs):.3f} s (min {min(xs):.3f}, max "  # noqa: E731
                      f"{max(xs):.3f}, n={len(xs)})")
    print(f"udajax step: {fmt(ours)}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    result.update(step_s=round(step_s, 4), steps_per_s=round(1.0 / step_s, 4),
                  images_per_s=round(images_per_step / step_s, 4), matmul_peak_flops=peak,
                  matmul_peak_fraction=round(flops / step_s / peak, 4), step_s_all=ours)
    if run_ref is not None:
      ref_s = statistics.median(theirs)
      print(f"reference step: {fmt(theirs)}")
      print(f"ratio ours/reference (median step time): {step_s / ref_s:.2f}x")
      result.update(reference_step_s=round(ref_s, 4), reference_step_s_all=theirs,
                    reference_torch_threads=threads, ratio_vs_reference=round(step_s / ref_s, 3))
  if run is not None and run_ref is not None and _BREAKDOWN.value:
    run_model = build_model_only(config, batch)
    ours_m, theirs_m = [], []
    for _ in range(_PAIRS.value):
      for _ in range(_STEPS.value):
        ours_m.append(run_model())
      for _ in range(_STEPS.value):
        theirs_m.append(run_ref_model())
    om, tm = statistics.median(ours_m), statistics.median(theirs_m)
    print(f"model forward + backward only (both domains): udajax {fmt(ours_m)}; reference "
          f"{fmt(theirs_m)}; ratio {om / tm:.2f}x")
    print(f"rest of the step (losses, their backward, update), by difference of medians: "
          f"udajax {step_s - om:.3f} s, reference {ref_s - tm:.3f} s")
    result.update(model_only_s=round(om, 4), reference_model_only_s=round(tm, 4),
                  model_only_ratio=round(om / tm, 3))
  emit(result)


if __name__ == "__main__":
  app.run(main)
