"""Converts PyTorch DeepLab-v2 checkpoints into udajax `{"params", "batch_stats"}` variables.

Reads every file a user of the reference (LTTM/UDAclustering) has:
- `DeepLab_resnet_pretrained_init-f81d91e8.pth` (ImageNet init; keys prefixed `Scale.`; its only
  head is `layer5`, which is dropped → no classifier in the output);
- the reference's own checkpoints `{"state_dict": {"module.<key>": ...}, "optimizer": ..., ...}`
  (ResNet: head `layer6`; VGG: `features.N` without pool4/pool5 plus fc6 = `features.29`,
  fc7 = `features.31`, head `classifier.conv2d_list.K`); a bare state dict works too;
- torchvision's `vgg16-397923af.pth` (`features.N` with the pools; its fully-connected
  `classifier.{0,3,6}` is not used; it has no fc6/fc7, so those are freshly initialised here with
  PyTorch's default conv init, as the reference does, and the output has no classifier).

Key mapping (PyTorch → udajax, conv weights OIHW → HWIO, BN weight/bias → scale/bias in
`params`, running_mean/running_var → mean/var in `batch_stats`):
  conv1, bn1                           → backbone/conv1, backbone/bn1
  layerL.J.{conv,bn}K                  → backbone/layerL/blockJ/{conv,bn}K
  layerL.J.downsample.0 / .1           → backbone/layerL/blockJ/downsample_conv / downsample_bn
  layer6.conv2d_list.K                 → classifier/convK           (ResNet head)
  features.N (13 convs, fc6, fc7)      → backbone/conv1_1 … conv5_3, fc6, fc7   (VGG)
  classifier.conv2d_list.K             → classifier/convK           (VGG head)
`layer5.*` (an unused stage-3 head) and `num_batches_tracked` are always dropped, as are head
branches beyond `aspp_branches` (the reference trains only branches 0 and 1). Every other key
must match the model exactly: all missing, unexpected and mis-shaped keys are reported together
in one `CheckpointConversionError`.

CLI:
  python data_prep/convert_torch_checkpoint.py --input=X.pth --output=DIR \
      [--backbone=resnet101|vgg16] [--num_classes=19]
writes the variables with `udajax.checkpoints.save_variables(DIR, ...)`.
"""

import argparse
import os
import re
import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make `udajax` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udajax import errors  # noqa: E402

RESNET101_BLOCKS = (3, 4, 23, 3)
TORCHVISION_VGG_CONV_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
REFERENCE_VGG_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31)  # + fc6, fc7

_PREFIXES = ("module.", "Scale.")


class CheckpointConversionError(errors.CheckpointError):
  """The PyTorch file is missing, unreadable or does not fit the requested model; the message
  names the file and every offending key."""


def load_torch_state_dict(path: str, trust_pickle: bool = False) -> Dict[str, np.ndarray]:
  """See `_read_state_dict`; returns only the state dict."""
  return _read_state_dict(path, trust_pickle)[0]


def _read_state_dict(path: str, trust_pickle: bool = False):
  """Reads a .pth file and returns its flat state dict as float32/int numpy arrays.

  Unwraps `{"state_dict": ...}` and strips leading `module.` / `Scale.` prefixes. Loads with
  `weights_only=True` (numpy scalars such as the reference's `best_MIou` allowed) unless
  `trust_pickle`, which runs the file's pickle code: only for files from a trusted source.
  Returns (state dict, description of the wrapping, e.g. "{'state_dict'}, prefix module.").
  """
  if not os.path.isfile(path):  # before importing torch (seconds)
    raise CheckpointConversionError(f"PyTorch checkpoint {path} does not exist")
  import torch  # only the converter needs torch

  allowed = [np.dtype] + [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
  scalar = getattr(getattr(getattr(np, "_core", np), "multiarray", None), "scalar", None)
  if scalar is not None:
    allowed.append(scalar)
  try:
    if trust_pickle:
      obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
      with torch.serialization.safe_globals(allowed):
        obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for unreadable/unsafe files
    hint = "" if trust_pickle else (
        " If the file comes from a trusted source and holds Python objects, retry with "
        "--trust_pickle.")
    raise CheckpointConversionError(
        f"cannot read PyTorch checkpoint {path}: {type(e).__name__}: {str(e)[:500]}{hint}") from e
  wrapping = []
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
    wrapping.append("{'state_dict': ...}")
  if not isinstance(obj, dict):
    raise CheckpointConversionError(
        f"{path} holds a {type(obj).__name__}, not a state dict (or {{'state_dict': ...}})")
  out = {}
  seen = set()
  for key, value in obj.items():
    name = str(key)
    stripped = True
    while stripped:
      stripped = False
      for prefix in _PREFIXES:
        if name.startswith(prefix):
          name, stripped = name[len(prefix):], True
          seen.add(prefix)
    if not hasattr(value, "detach"):
      raise CheckpointConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, "
                                      "not a tensor")
    if name in out:
      raise CheckpointConversionError(f"{path}: key {key!r} duplicates {name!r} after removing "
                                      "the module./Scale. prefix")
    out[name] = value.detach().cpu().numpy()
  wrapping += [f"prefix {p}" for p in sorted(seen)]
  return out, ", ".join(wrapping)


def _resnet_torch_key(collection: str, path: Tuple[str, ...]) -> str:
  """PyTorch key of a udajax ResNet variable (inverse of the mapping in the module docstring)."""
  parts = []
  for p in path[:-1]:
    if p == "backbone":
      continue
    if p == "classifier":
      parts.append("layer6")
    elif re.fullmatch(r"block\d+", p):
      parts.append(p[5:])
    elif p == "downsample_conv":
      parts.append("downsample.0")
    elif p == "downsample_bn":
      parts.append("downsample.1")
    elif re.fullmatch(r"conv\d+", p) and path[0] == "classifier":
      parts.append(f"conv2d_list.{p[4:]}")
    else:
      parts.append(p)
  return ".".join(parts + [_leaf_name(collection, path[-1])])


def _vgg_torch_key(collection: str, path: Tuple[str, ...], conv_index: Dict[str, int]) -> str:
  if path[0] == "classifier":
    return f"classifier.conv2d_list.{path[1][4:]}.{_leaf_name(collection, path[-1])}"
  if path[1] not in conv_index:  # fc6/fc7 of the torchvision layout: not in the file
    return f"{path[1]}.{_leaf_name(collection, path[-1])}"
  return f"features.{conv_index[path[1]]}.{_leaf_name(collection, path[-1])}"


def _leaf_name(collection: str, leaf: str) -> str:
  if collection == "batch_stats":
    return {"mean": "running_mean", "var": "running_var"}[leaf]
  return {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _model(backbone, num_classes, aspp_branches, stage_blocks, base_width, vgg_width):
  from udajax.models import DeepLabV2
  dilations = (6, 12, 18, 24)[:aspp_branches]
  return DeepLabV2(num_classes, backbone=backbone, stage_blocks=tuple(stage_blocks),
                   base_width=base_width, vgg_width=vgg_width, aspp_dilations=dilations)


def _detect_num_classes(sd, head_prefix):
  key = f"{head_prefix}0.weight"
  return int(sd[key].shape[0]) if key in sd and sd[key].ndim == 4 else None


def convert_state_dict(state_dict: Dict[str, np.ndarray], backbone: str = "resnet101", *,
                       num_classes: Optional[int] = None, aspp_branches: int = 2,
                       stage_blocks: Sequence[int] = RESNET101_BLOCKS, base_width: int = 64,
                       vgg_width: int = 64, seed: int = 0, source: str = "state dict"):
  """Converts a flat (prefix-free) PyTorch state dict. Returns `(variables, info)`.

  `variables` = {"params": ..., "batch_stats": ...} (numpy; VGG has no "batch_stats");
  "classifier" is present only if the state dict has a head. `info` summarises the conversion:
  layout, tensors, classifier, num_classes, dropped keys, freshly initialised entries.
  `num_classes`, if given, must equal the head's class count (ignored without a head).
  """
  import jax
  import jax.numpy as jnp

  if backbone not in ("resnet101", "vgg16"):
    raise ValueError(f"backbone must be 'resnet101' or 'vgg16', got {backbone!r}")
  if not 1 <= aspp_branches <= 4:
    raise ValueError(f"aspp_branches must be in 1..4, got {aspp_branches}")
  sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  dropped = []
  conv_index = None
  if backbone == "resnet101":
    layout = "reference ResNet"
    head_prefix = "layer6.conv2d_list."
    dropped += [k for k in sd if k.startswith("layer5.")]
  else:
    head_prefix = "classifier.conv2d_list."
    if "features.24.weight" in sd or "classifier.0.weight" in sd:
      layout = "torchvision vgg16"
      idx = TORCHVISION_VGG_CONV_IDX
      dropped += [k for k in sd if re.fullmatch(r"classifier\.\d+\.(weight|bias)", k)]
    else:
      layout = "reference VGG"
      idx = REFERENCE_VGG_IDX
    from udajax.models import VGG_CONV_NAMES
    conv_index = dict(zip(VGG_CONV_NAMES + ("fc6", "fc7"), idx))
  head_re = re.compile(re.escape(head_prefix) + r"(\d+)\.")
  for k in sd:
    m = head_re.match(k)
    if m and int(m.group(1)) >= aspp_branches:
      dropped.append(k)
  dropped_set = set(dropped)
  sd = {k: v for k, v in sd.items() if k not in dropped_set}

  has_head = any(k.startswith(head_prefix) for k in sd)
  file_classes = _detect_num_classes(sd, head_prefix)
  if has_head and num_classes is not None and file_classes not in (None, num_classes):
    raise CheckpointConversionError(
        f"{source}: its classifier has {file_classes} classes but --num_classes={num_classes}; "
        "convert with the matching --num_classes or pass --drop_classifier to keep the backbone "
        "only")
  n_cls = file_classes or num_classes or 19
  model = _model(backbone, n_cls, aspp_branches, stage_blocks, base_width, vgg_width)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  shapes = jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)

  expected = {}  # torch key -> (collection, path, expected numpy-layout shape)
  for collection in ("params", "batch_stats"):
    for path, shape in _flatten(shapes.get(collection, {})):
      if path[0] == "classifier" and not has_head:
        continue
      if backbone == "resnet101":
        key = _resnet_torch_key(collection, path)
      else:
        key = _vgg_torch_key(collection, path, conv_index)
      expected[key] = (collection, path, shape)

  fresh = []
  if layout == "torchvision vgg16":  # no fc6/fc7 in torchvision's vgg16: fresh init
    fresh = [k for k, (c, p, s) in expected.items() if p[1] in ("fc6", "fc7")]

  variables = {}
  problems = []
  for key in sorted(sd):
    if key not in expected:
      problems.append(f"unexpected key {key} {tuple(sd[key].shape)}")
      continue
    collection, path, shape = expected[key]
    value = np.asarray(sd[key], dtype=np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if tuple(value.shape) != tuple(shape):
      problems.append(f"shape mismatch {key}: file {tuple(sd[key].shape)} (as HWIO "
                      f"{tuple(value.shape)}) vs model {tuple(shape)}")
      continue
    _set(variables.setdefault(collection, {}), path, value)
  missing = [k for k in expected if k not in sd and k not in fresh]
  problems += [f"missing key {k}" for k in sorted(missing)]
  if problems:
    count = len(problems)
    if backbone == "vgg16" and "layer1.0.conv1.weight" in sd:
      problems.insert(0, "hint: this looks like a ResNet checkpoint; use --backbone=resnet101")
    elif backbone == "resnet101" and "features.0.weight" in sd:
      problems.insert(0, "hint: this looks like a VGG checkpoint; use --backbone=vgg16")
    raise CheckpointConversionError(
        f"{source} does not fit DeepLabV2(backbone={backbone!r}, stage_blocks="
        f"{tuple(stage_blocks)}, base_width={base_width}, vgg_width={vgg_width}, "
        f"aspp_branches={aspp_branches}) ({layout} layout); {count} problem(s):\n  "
        + "\n  ".join(problems))

  if fresh:  # PyTorch's default conv init U(±1/sqrt(fan_in)), as nn.Conv2d gives the reference's
    rng = np.random.default_rng(seed)  # fc6/fc7 (numpy: jax RNG compiles slowly on CPU)
    for key in fresh:
      collection, path, shape = expected[key]
      fan_in = int(np.prod(expected[key.rsplit(".", 1)[0] + ".weight"][2][:3]))
      bound = 1.0 / np.sqrt(fan_in)
      value = rng.uniform(-bound, bound, size=shape).astype(np.float32)
      _set(variables.setdefault(collection, {}), path, value)
  info = dict(layout=layout, tensors=len(sd), classifier=has_head,
              num_classes=file_classes if has_head else None, dropped=sorted(dropped),
              fresh=sorted(fresh))
  return variables, info


def convert_checkpoint(path: str, backbone: str = "resnet101", *,
                       num_classes: Optional[int] = None, aspp_branches: int = 2,
                       stage_blocks: Sequence[int] = RESNET101_BLOCKS, base_width: int = 64,
                       vgg_width: int = 64, drop_classifier: bool = False,
                       trust_pickle: bool = False, seed: int = 0) -> dict:
  """Reads a PyTorch .pth and returns `{"params": ..., "batch_stats": ...}` (numpy arrays).

  The "classifier" subtree is present only if the file has a head (the reference's trained
  `layer6` / VGG `classifier`) and `drop_classifier` is False; the trainer initialises it
  otherwise. Raises CheckpointConversionError naming every missing/unexpected/mis-shaped key.
  """
  return convert_checkpoint_with_info(
      path, backbone, num_classes=num_classes, aspp_branches=aspp_branches,
      stage_blocks=stage_blocks, base_width=base_width, vgg_width=vgg_width,
      drop_classifier=drop_classifier, trust_pickle=trust_pickle, seed=seed)[0]


def convert_checkpoint_with_info(path: str, backbone: str = "resnet101", *,
                                 drop_classifier: bool = False, trust_pickle: bool = False,
                                 **kwargs):
  """`convert_checkpoint` that also returns the summary dict of `convert_state_dict`."""
  sd, wrapping = _read_state_dict(path, trust_pickle=trust_pickle)
  if drop_classifier:
    head = ("layer6.conv2d_list.",) if backbone == "resnet101" else ("classifier.conv2d_list.",)
    sd = {k: v for k, v in sd.items() if not k.startswith(head)}
  variables, info = convert_state_dict(sd, backbone, source=path, **kwargs)
  if wrapping:
    info["layout"] += f"; {wrapping}"
  return variables, info


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True, help="PyTorch .pth file")
  parser.add_argument("--output", required=True, help="orbax directory to create")
  parser.add_argument("--backbone", default="resnet101", choices=("resnet101", "vgg16"))
  parser.add_argument("--num_classes", type=int, default=None,
                      help="expected classes of the file's classifier (checked if it has one)")
  parser.add_argument("--aspp_branches", type=int, default=2,
                      help="ASPP branches to keep (2 = reference, 4 = all dilations)")
  parser.add_argument("--drop_classifier", action="store_true",
                      help="keep only the backbone even if the file has a classifier")
  parser.add_argument("--trust_pickle", action="store_true",
                      help="load with weights_only=False (runs pickle code; trusted files only)")
  parser.add_argument("--seed", type=int, default=0, help="seed for freshly initialised fc6/fc7")
  parser.add_argument("--stage_blocks", default="3,4,23,3",
                      help="ResNet blocks per stage (non-default only for custom nets)")
  parser.add_argument("--base_width", type=int, default=64, help="ResNet base width")
  parser.add_argument("--vgg_width", type=int, default=64, help="VGG conv1 width")
  args = parser.parse_args(argv)

  try:
    variables, info = convert_checkpoint_with_info(
        args.input, args.backbone, num_classes=args.num_classes,
        aspp_branches=args.aspp_branches, drop_classifier=args.drop_classifier,
        trust_pickle=args.trust_pickle, seed=args.seed,
        stage_blocks=tuple(int(b) for b in args.stage_blocks.split(",")),
        base_width=args.base_width, vgg_width=args.vgg_width)
    from udajax.checkpoints import save_variables
    out = save_variables(args.output, variables)
  except errors.USER_ERRORS as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2
  n_params = sum(1 for _ in _flatten(variables.get("params", {})))
  n_stats = sum(1 for _ in _flatten(variables.get("batch_stats", {})))
  print(f"converted {info['tensors']} tensors from {args.input} (layout: {info['layout']}) "
        f"into {n_params} params + {n_stats} batch_stats arrays")
  if info["classifier"]:
    print(f"classifier found: {info['num_classes']} classes, {args.aspp_branches} ASPP branches")
  else:
    print("no classifier in the file: the trainer initialises it (weights N(0, 0.01^2))")
  if info["dropped"]:
    print(f"dropped {len(info['dropped'])} unused tensors: "
          + ", ".join(sorted({k.rsplit('.', 1)[0] for k in info['dropped']})))
  if info["fresh"]:
    print(f"not in the file, freshly initialised (seed {args.seed}): "
          + ", ".join(sorted({k.rsplit('.', 1)[0] for k in info['fresh']})))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
