"""Where the train step's time goes, per op category: udajax (jax.profiler) and the reference.

Runs the same step as `bench_train_step.py` (the trainer's pmapped UDA step on one device,
random inputs at the config's crop sizes), traces `--steps` steps with `jax.profiler`, and sums
the time of every XLA operation (one thunk of the compiled CPU program: a fused kernel, a
convolution, a copy) by category. Categories come from the optimised HLO of the compiled step:

  conv forward            convolutions of the forward pass
  conv input gradient     convolutions of the backward pass that produce an activation gradient
  conv weight gradient    convolutions of the backward pass that produce a kernel gradient
  matmul                  dot products (the model's 1×1 convolutions, `udajax.conv.pointwise_conv`;
                          the losses)
  reductions              fused kernels containing a reduce (BatchNorm statistics, loss sums)
  layout copies           fused kernels that only transpose / copy / pad / slice
  elementwise             other fused kernels (BatchNorm normalisation, ReLU, SGD update, ...)

and each operation is also split into model / losses and update by the flax module path in its
HLO metadata. With --reference_dir the authors' PyTorch step at the same shapes is profiled with
`torch.profiler` (self CPU time per aten operator, grouped into the same categories where they
exist: torch computes a convolution's input and weight gradients in one operator).

  python benchmarks/profile_train_step.py --config=configs/gta.py \
      --config.source.image_size="(128, 256)" --config.target.image_size="(128, 256)" \
      [--reference_dir=/tmp/ref/UDAclustering] [--steps=3] [--trace_dir=/tmp/trace] [--top=15]

Prints one table per implementation (ms per step, share of the summed operation time, number of
operations) and the `--top` slowest single operations of udajax with their shapes. The summed
operation time can exceed the wall time when XLA runs independent operations on both cores at
once; the wall time per step is printed too. Also writes the tables as one JSON line to
--output when given.
"""

import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import bench_train_step as bts  # noqa: E402  (its flags are ours too)
from benchmarks.common import cpu_name  # noqa: E402
from udajax.cli import fail  # noqa: E402

_TRACE_DIR = flags.DEFINE_string("trace_dir", None,
                                 "keep the jax.profiler trace here (default: a temporary folder)")
_TOP = flags.DEFINE_integer("top", 15, "list this many slowest single operations")

CATEGORIES = ("conv forward", "conv input gradient", "conv weight gradient", "matmul",
              "reductions", "elementwise", "layout copies", "other")

_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (\S+) (\S+?)\(")


def parse_hlo(text):
  """Optimised HLO text -> ({computation: [instruction lines]}, {entry instruction: line})."""
  computations, entry, current = {}, {}, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY )?%(\S+) ", line)
    if head and line.rstrip().endswith("{"):
      current = "ENTRY" if head.group(1) else head.group(2)
      computations[current] = []
      continue
    if current is not None and _INSTRUCTION.match(line):
      computations[current].append(line)
      if current == "ENTRY":
        entry[_INSTRUCTION.match(line).group(2)] = line
  return computations, entry


def _called(line, computations):
  """The lines of the computations an instruction calls (fusions, wrapped ops), recursively."""
  out = []
  for name in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
    for inner in computations.get(name, []):
      out.append(inner)
      out.extend(_called(inner, computations))
  return out


def classify(line, computations):
  """(category, part) of one entry-level HLO instruction. part: "model" or "losses/update"."""
  body = [line] + _called(line, computations)
  opcodes = {_INSTRUCTION.match(x).group(4) for x in body if _INSTRUCTION.match(x)}
  names = " ".join(re.findall(r'op_name="([^"]*)"', " ".join(body)))
  part = "model" if re.search(r"DeepLab|backbone|layer\d|aspp|classifier", names) else \
      "losses/update"
  if "convolution" in opcodes:
    part = "model"  # only the network convolves (kernel gradients carry no op_name)
    conv = next(x for x in body if " convolution(" in x)
    window = re.search(r"size=([\dx]+)", conv)
    taps = int(np.prod([int(v) for v in window.group(1).split("x")])) if window else 1
    # XLA writes a kernel gradient as a convolution whose window is the feature map and whose
    # output's spatial size is the kernel's: its window is larger than its output.
    out_dims = [int(v) for v in re.search(r"= \w+\[([\d,]*)\]", conv).group(1).split(",")]
    labels = re.search(r"dim_labels=\S*->(\w+)", conv).group(1)
    out_taps = out_dims[labels.index("0")] * out_dims[labels.index("1")]
    if taps > out_taps:
      category = "conv weight gradient"
    elif "transpose(" in names or "transpose(" in conv:
      category = "conv input gradient"
    else:
      category = "conv forward"
  elif "dot" in opcodes:
    category = "matmul"
  elif opcodes & {"reduce", "reduce-window", "all-reduce"}:
    category = "reductions"
  elif opcodes <= {"parameter", "transpose", "copy", "bitcast", "pad", "slice", "reshape",
                   "broadcast", "concatenate", "dynamic-slice", "dynamic-update-slice",
                   "constant", "reverse", "tuple", "get-tuple-element"}:
    category = "layout copies"
  elif "fusion" in opcodes or opcodes - {"parameter"}:
    category = "elementwise"
  else:
    category = "other"
  return category, part


def op_name(line, computations):
  """The last three parts of the JAX source path of an instruction's last fused operation."""
  names = re.findall(r'op_name="([^"]*)"', " ".join([line] + _called(line, computations)))
  return "/".join(names[-1].split("/")[-3:]) if names else ""


def xplane_events(trace_dir):
  """[(name, duration seconds)] of every XLA operation event in the trace files under a folder."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # ships with tensorflow (tfds)
  events = []
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
      space.ParseFromString(f.read())
    for plane in space.planes:
      meta = plane.event_metadata
      for line in plane.lines:
        for e in line.events:
          events.append((meta[e.metadata_id].name, e.duration_ps * 1e-12))
  return events


def profile_ours(config, batch):
  """Category table of udajax's step: (rows, per-op list, wall seconds per step)."""
  compiled, state, batch, _ = bts.compile_step(config, batch)
  computations, entry = parse_hlo(compiled.as_text())
  for _ in range(max(bts._WARMUP.value, 1)):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="udajax_trace_")
  steps = bts._STEPS.value
  walls = []
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      t = time.perf_counter()
      state, _ = compiled(state, batch)
      jax.block_until_ready(state)
      walls.append(time.perf_counter() - t)
  per_op = collections.defaultdict(float)
  for name, seconds in xplane_events(trace_dir):
    if name in entry:
      per_op[name] += seconds / steps
  table = collections.defaultdict(lambda: [0.0, 0])
  ops = []
  for name, seconds in per_op.items():
    category, part = classify(entry[name], computations)
    for key in (category, f"{part}: {category}"):
      table[key][0] += seconds
      table[key][1] += 1
    shape = _INSTRUCTION.match(entry[name]).group(3).split("{")[0]
    ops.append((seconds, name, category, part, shape, op_name(entry[name], computations)))
  ops.sort(reverse=True)
  return table, ops, statistics.median(walls)


TORCH_CATEGORIES = (
    ("conv forward", ("convolution", "mkldnn_convolution", "_convolution", "conv2d")),
    ("conv backward (input + weight gradient)", ("convolution_backward",)),
    ("matmul", ("mm", "bmm", "matmul", "addmm", "linear", "cdist", "_cdist_forward",
                "_cdist_backward", "_euclidean_dist")),
)


def torch_category(op):
  """Category of an aten operator name, e.g. 'aten::native_batch_norm_backward'."""
  short = op.split("::")[-1]
  for category, names in TORCH_CATEGORIES:
    if short in names:
      return category
  if "batch_norm" in short:
    return "batchnorm (statistics + normalisation, fwd/bwd)"
  if short in ("sum", "mean", "norm", "max", "min", "var", "std", "linalg_vector_norm", "amax",
               "argmax", "nll_loss2d_forward", "nll_loss2d_backward", "_log_softmax",
               "_log_softmax_backward_data", "_softmax", "_softmax_backward_data"):
    return "reductions"
  if short in ("copy_", "contiguous", "clone", "permute", "transpose", "view", "reshape",
               "cat", "index", "index_put_", "scatter_", "gather", "expand", "repeat",
               "fill_", "zero_", "zeros", "empty", "empty_like", "zeros_like", "ones_like"):
    return "layout copies"
  return "elementwise"


def profile_reference(config, batch):
  """Category table of the reference step from torch.profiler: (rows, wall seconds per step)."""
  import torch  # only the comparison needs torch
  run, _, _, _ = bts.build_reference(config, batch)
  for _ in range(max(bts._WARMUP.value, 1)):
    run()
  steps = bts._STEPS.value
  walls = []
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      walls.append(run()[0])
  table = collections.defaultdict(lambda: [0.0, 0])
  for avg in prof.key_averages():
    if not avg.key.startswith("aten::"):
      continue
    seconds = avg.self_cpu_time_total * 1e-6 / steps
    row = table[torch_category(avg.key)]
    row[0] += seconds
    row[1] += avg.count // steps
  return table, statistics.median(walls)


def print_table(title, table, wall, keys):
  total = sum(table[k][0] for k in keys if k in table)
  print(f"\n{title}: wall {wall * 1e3:.0f} ms per step (median), summed operation time "
        f"{total * 1e3:.0f} ms")
  print(f"  {'category':52s} {'ms/step':>9s} {'share':>7s} {'ops':>6s}")
  for k in keys:
    if k in table:
      s, n = table[k]
      print(f"  {k:52s} {s * 1e3:9.1f} {100 * s / total:6.1f}% {n:6d}")
  return {k: round(table[k][0] * 1e3, 2) for k in keys if k in table}


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
  config = bts._CONFIG.value
  if config is None:
    fail("--config is required, e.g. --config=configs/gta.py")
  if config.train.mode != "uda":
    fail("profile_train_step times the UDA step: use a UDA config")
  print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; jax {jax.__version__}; "
        f"device {jax.devices()[0].device_kind}")
  batch = bts.make_batch(config, np.random.default_rng(bts._SEED.value))
  table, ops, wall = profile_ours(config, batch)
  result = {"source_size": list(config.source.image_size),
            "target_size": list(config.target.image_size), "backbone": config.model.backbone,
            "dtype": config.model.dtype, "remat": bool(config.model.remat),
            "udajax_wall_ms": round(wall * 1e3, 1)}
  result["udajax_ms"] = print_table("udajax (jax.profiler, XLA operations)", table, wall,
                                    CATEGORIES)
  parts = [f"{p}: {c}" for p in ("model", "losses/update") for c in CATEGORIES]
  result["udajax_ms_by_part"] = print_table("udajax, split by model / losses and update",
                                            table, wall, parts)
  print(f"\n  slowest {_TOP.value} single operations (ms/step, category, part, output shape, "
        "source operation):")
  for seconds, name, category, part, shape, source in ops[:_TOP.value]:
    print(f"  {seconds * 1e3:8.1f}  {name:28s} {category:20s} {part:13s} {shape:22s} {source}")
  if bts._REFERENCE_DIR.value:
    ref_table, ref_wall = profile_reference(config, batch)
    keys = sorted(ref_table, key=lambda k: -ref_table[k][0])
    result["reference_wall_ms"] = round(ref_wall * 1e3, 1)
    result["reference_ms"] = print_table("reference (torch.profiler, self CPU time of aten "
                                         "operators)", ref_table, ref_wall, keys)
  bts.emit(result)


if __name__ == "__main__":
  app.run(main)
