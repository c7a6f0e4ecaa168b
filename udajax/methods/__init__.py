"""Adaptation methods: the target-domain objectives a UDA step adds to the source cross-entropy.

`config.adaptation.method` names one entry of `METHODS`. A method is a module with

    STATE_FIELD: str
        the `TrainState` field that holds the method's own state ("method_state", or
        "centroid_state" for "clustering": its field name predates this package, so work
        directories written before it still resume);
    init_state(config, feature_dim, rng) -> pytree or None
        the method's initial state (`feature_dim()` gives the encoder's channel count);
    loss_terms(outputs, state, *, config, step, axis_name) -> MethodOutput
        `outputs` are the step's `StepOutputs` for both domains, `state` the method's state,
        `step` the train step (int32 scalar) before this update.

`MethodOutput.terms` are global-batch scalars (float32) logged as `train/<name>`;
`MethodOutput.weights` maps the names of the terms that enter the objective to their lambda
(the train step adds `lambda * term` to the loss in that order; the other terms are only
logged); `MethodOutput.state` is the method's new state (kept unchanged when the step is
skipped by the NaN guard). The gradient of the weighted terms w.r.t. the segmenter's params is
the train step's business; a method that trains parameters of its own (the discriminator of
"adversarial") updates them itself and returns them in its state.

Adding a method: one module here, one entry in `METHODS`, its configs (configs/*.py).
"""

from udajax.methods import adversarial
from udajax.methods import clustering
from udajax.methods import maxsquare
from udajax.methods import minent
from udajax.methods.base import MethodOutput, StepOutputs  # noqa: F401  (re-exported)

METHODS = {
    "clustering": clustering,    # the paper: L_cl + L_or + L_sp (+ EM), config.loss.*
    "minent": minent,            # ADVENT direct entropy minimisation (Vu et al., CVPR 2019)
    "maxsquare": maxsquare,      # image-wise weighted max-square (Chen et al., ICCV 2019)
    "adversarial": adversarial,  # feature-level adversarial (Tsai et al., CVPR 2018)
}


def get(config):
  """The method module named by `config.adaptation.method` (validated by the config)."""
  return METHODS[config.adaptation.method]
