"""Shared by the benchmark scripts: a description of the machine a figure was measured on, and
the one-JSON-line result they print."""

import json
import platform


def cpu_name() -> str:
  """The CPU model name (from /proc/cpuinfo on Linux), e.g. "AMD EPYC 9R14 96-Core Processor"."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def emit_json(result: dict, output=None) -> None:
  """Prints `result` as one JSON line, also appended to the file `output` when given."""
  line = json.dumps(result)
  if output:
    with open(output, "a") as f:
      f.write(line + "\n")
  print(line)


def reference_loss_classes(reference_dir: str):
  """(feature-regularisation loss class, IW max-square loss class) of the authors' code.

  Loads `utils/losses.py` of a checkout of the reference (kept outside this repository) by file
  path: importing its `utils` package would pull in its dataset code. The module defines two
  `torch.nn.Module` classes, found by their name prefixes ("feat", "iw"). Raises
  FileNotFoundError when the file is missing.
  """
  import importlib.util
  import os

  import torch  # only the comparison with the reference needs torch

  path = os.path.join(reference_dir, "utils", "losses.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--reference_dir: {path} not found (clone LTTM/UDAclustering there)")
  spec = importlib.util.spec_from_file_location("reference_uda_losses", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  classes = {n.lower(): c for n, c in vars(module).items() if isinstance(c, type)
             and issubclass(c, torch.nn.Module) and c.__module__ == spec.name}
  feature_cls = next(c for n, c in classes.items() if n.startswith("feat"))
  iw_cls = next(c for n, c in classes.items() if n.startswith("iw"))
  return feature_cls, iw_cls
