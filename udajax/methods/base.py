"""The types an adaptation method receives and returns (see `udajax.methods`)."""

from typing import Any, Dict, NamedTuple


class StepOutputs(NamedTuple):
  """The outputs of one UDA step's two forwards (this device's share of the global batch).

  source_logits / target_logits: (B, H, W, C) logits at the input size (model dtype);
  source_prob / target_prob: (B, H, W, C) float32 softmax of those logits;
  source_feat / target_feat: (B, h, w, F) encoder features at stride 8 (model dtype);
  source_label: (B, H, W) int32, 255 (any value outside [0, C)) = ignore.
  """
  source_logits: Any
  source_prob: Any
  source_feat: Any
  target_logits: Any
  target_prob: Any
  target_feat: Any
  source_label: Any


class MethodOutput(NamedTuple):
  terms: Dict[str, Any]
  weights: Dict[str, float]
  state: Any
