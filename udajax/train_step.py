"""Train state and the per-device UDA train / eval steps (jax, flax, optax only; no TensorFlow).

The steps are written for one device with named-axis collectives and are run under
`jax.pmap(..., axis_name="batch")`:

* every loss is a *global-batch* loss (sums and counts over all devices, see `udajax.losses`),
  and each device's gradient w.r.t. its own images is its slice of the single-device gradient;
  parameter gradients are therefore **summed** (`psum`) over devices, which gives exactly the
  gradient one device would compute on the whole global batch;
* BatchNorm running statistics are averaged (`pmean`) over devices after every step, so the
  state stays replicated (with `config.model.sync_bn` they are equal anyway: BN then normalises
  with global-batch statistics, exactly like one device on the global batch).
"""

import functools
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state as flax_train_state

from udajax import compiles
from udajax import losses
from udajax import methods
from udajax import metrics as metrics_lib
from udajax import models
from udajax import ops
from udajax import optim

AXIS = "batch"


class TrainState(flax_train_state.TrainState):
  """params, opt_state, step (flax), BN statistics, adaptation-method state, an RNG key.

  The method's state (`udajax.methods`) lives in `centroid_state` ("clustering") or
  `method_state` (others, e.g. the adversarial discriminator's params and Adam state).
  """
  batch_stats: Any = None
  centroid_state: Any = None
  rng: Any = None
  method_state: Any = None

  @classmethod
  def create(cls, **kwargs):
    """flax's `create` with `step` a strong int32. flax starts it as the Python int 0, which a
    jitted function sees weakly typed and returns weakly typed (`step + 1`), while the pmapped
    step returns a strong int32: a state that went through a jitted function would make the
    pmapped step compile a second time."""
    return super().create(**kwargs).replace(step=jnp.zeros((), jnp.int32))


def create_model(config, *, axis_name=AXIS) -> models.DeepLabV2:
  m = config.model
  return models.DeepLabV2(
      num_classes=config.num_classes,
      backbone=m.backbone,
      stage_blocks=tuple(m.stage_blocks),
      base_width=m.base_width,
      vgg_width=m.vgg_width,
      aspp_dilations=tuple(m.aspp_dilations),
      dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
      bn_axis_name=axis_name if m.sync_bn else None,
      remat=m.remat,
  )


def frozen_prefixes(config):
  return optim.RESNET_FROZEN_PREFIXES if config.model.backbone == "resnet101" else ()


def create_optimizer(config):
  t = config.train
  return optim.make_optimizer(
      learning_rate=t.lr, num_steps=t.num_steps, optimizer=t.optimizer, momentum=t.momentum,
      weight_decay=t.weight_decay, poly_power=t.poly_power, head_lr_mult=t.head_lr_mult,
      frozen_prefixes=frozen_prefixes(config))


def init_variables(config, rng, image_size=(64, 64)):
  """Fresh variables of the configured model (shapes do not depend on the image size)."""
  model = create_model(config, axis_name=None)
  images = jnp.zeros((1,) + tuple(image_size) + (3,), jnp.float32)
  return compiles.jit_init(functools.partial(model.init, train=False), rng, images)


def feature_dim(config) -> int:
  model = create_model(config, axis_name=None)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                             images)
  _, feats = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  return feats.shape[-1]


def create_train_state(config, variables, rng) -> TrainState:
  """A TrainState from model variables (numpy or jax arrays)."""
  tx, _ = create_optimizer(config)
  model = create_model(config)
  method, method_state = methods.get(config), {}
  if config.train.mode == "uda":
    method_state = {method.STATE_FIELD: method.init_state(
        config, functools.partial(feature_dim, config), jax.random.fold_in(rng, 1))}
  params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=tx,
      batch_stats=jax.tree_util.tree_map(jnp.asarray, variables.get("batch_stats", {})),
      rng=rng, **method_state)


def unreplicate(tree):
  """The first local device's copy of a pmap-replicated tree, as host numpy arrays (leading
  device axis removed).

  The copy is fetched whole and sliced on the host: slicing on the device compiled two small
  XLA programs per distinct leaf shape in every process. (flax.jax_utils.unreplicate keeps the
  device axis when pmap ran on 1 of several devices.)
  """
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0, ...], tree)


def replicate(tree, devices=None, axis_name=AXIS):
  """`tree` stacked on a leading device axis with the sharding the pmapped step returns (mesh
  axis `axis_name`; flax's default axis name "_device_put_sharded" made step 2 recompile).

  `devices` defaults to the local devices in pmap's order. Each leaf goes through the host and
  is transferred to every device as it is (flax.jax_utils.replicate stacks jax arrays on the
  device, which compiled two small XLA programs per distinct leaf shape in every process).
  """
  devices = jax.local_devices() if devices is None else list(devices)
  sharding = device_sharding(devices, axis_name)

  def replicate_leaf(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x[None], (len(devices),) + x.shape), sharding)

  return jax.tree_util.tree_map(replicate_leaf, tree)


def device_sharding(devices=None, axis_name=AXIS) -> jax.sharding.NamedSharding:
  """The sharding of a pmapped step's inputs and outputs: the leading axis split over `devices`
  (default: the local devices in pmap's order) on the mesh axis `axis_name`."""
  devices = jax.local_devices() if devices is None else devices
  return jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (axis_name,)), jax.P(axis_name))


def _softmax(logits):
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _all_finite(tree):
  """True (a scalar) iff no element of any leaf of `tree` is NaN or Inf.

  The per-leaf flags are counted with a cumulative sum, not combined with `jnp.all`: XLA rewrites
  `all(stack(flags))` into a chain of scalar ANDs, one per leaf, and its fuser then copies that
  whole chain into each of the per-tensor update kernels that select on the result (a chain of
  ~65 ANDs in each of ~145 kernels for the tests' tiny model, quadratic in the number of
  tensors). The cumulative sum stays one operation whose result the kernels read. Same value;
  on a 2-core CPU the ResNet-101 paper step compiles in 15 s instead of 64 s
  (benchmarks/finite_flag_compile.py).
  """
  flags = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)])
  return jnp.cumsum(flags.astype(jnp.int32))[-1] == flags.shape[0]


def loss_and_grads(state: TrainState, batch: Dict[str, jnp.ndarray], *, config, axis_name=AXIS):
  """All loss terms of one device's share of the global batch and this device's gradient.

  Args:
    state: the (replicated) TrainState.
    batch: "source_image" (B, Hs, Ws, 3), "source_label" (B, Hs, Ws) int32 and, in UDA mode,
      "target_image" (B, Ht, Wt, 3).
  Returns:
    ((terms, batch_stats, updates), grads): the loss terms (global values, float32), the BN
    statistics after the source then the target forward, the adaptation method's new state as
    {its TrainState field: value} (empty in source-only mode), and the gradient of "total"
    w.r.t. `state.params` from this device's images (its `psum` over devices is the
    global-batch gradient). The UDA terms come from `config.adaptation.method`
    (`udajax.methods`): total = ce + sum of lambda * term over the method's weighted terms.
  """
  method = methods.get(config)

  def loss_fn(params):
    (logits_s, feat_s), mutated = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["source_image"],
        train=True, mutable=["batch_stats"])
    terms = {"ce": losses.cross_entropy(logits_s, batch["source_label"], axis_name=axis_name)}
    total, updates = terms["ce"], {}
    if config.train.mode == "uda":
      # The target forward starts from the BN statistics the source forward just updated.
      (logits_t, feat_t), mutated = state.apply_fn(
          {"params": params, "batch_stats": mutated["batch_stats"]}, batch["target_image"],
          train=True, mutable=["batch_stats"])
      outputs = methods.StepOutputs(logits_s, _softmax(logits_s), feat_s, logits_t,
                                    _softmax(logits_t), feat_t, batch["source_label"])
      out = method.loss_terms(outputs, getattr(state, method.STATE_FIELD), config=config,
                              step=state.step, axis_name=axis_name)
      terms.update(out.terms)
      for name, weight in out.weights.items():
        total = total + weight * out.terms[name]
      updates = {method.STATE_FIELD: out.state}
    terms["total"] = total
    return total, (terms, mutated["batch_stats"], updates)

  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return aux, grads


def train_step(state: TrainState, batch: Dict[str, jnp.ndarray], *, config, schedule: Callable,
               axis_name=AXIS):
  """One optimiser update on one device's share of the global batch.

  Args:
    state: the (replicated) TrainState.
    batch: as `loss_and_grads`.
  Returns:
    (new_state, metrics) where metrics holds every loss term (global values), the lr, and
    "finite" (1.0, or 0.0 when a loss term, a gradient or the method's new state was NaN/Inf
    and the update was not applied).
  """
  (terms, batch_stats, updates), grads = loss_and_grads(
      state, batch, config=config, axis_name=axis_name)
  grads = jax.lax.psum(grads, axis_name)
  batch_stats = jax.lax.pmean(batch_stats, axis_name)
  finite = _all_finite((terms, grads, updates))

  rng, _ = jax.random.split(state.rng)
  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats, rng=rng, **updates)
  # A NaN/Inf step leaves params, momentum, BN and method state untouched; the step and the
  # optimiser's schedule counters still advance, so the lr stays a function of the step.
  skipped = state.replace(step=updated.step, rng=rng,
                          opt_state=optax.tree_utils.tree_set(state.opt_state, count=updated.step))
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, skipped)
  out = dict(terms)
  out["lr"] = schedule(state.step)
  out["finite"] = finite.astype(jnp.float32)
  return new_state, out


def make_train_step(config, axis_name=AXIS):
  """The per-device train step `(state, batch) -> (state, metrics)` of `config` (to be pmapped)."""
  _, schedule = create_optimizer(config)
  return functools.partial(train_step, config=config, schedule=schedule, axis_name=axis_name)


def make_p_train_step(config, axis_name=AXIS, devices=None, donate=True):
  """The pmapped train step over `devices` (default: all local devices).

  The model is the state's `apply_fn` (see `create_train_state`). Call it with a state placed
  by `replicate` (one compilation).
  """
  return jax.pmap(make_train_step(config, axis_name), axis_name=axis_name, devices=devices,
                  donate_argnums=(0,) if donate else ())


def predict_logits(model, variables, images, *, flip: bool = False, out_size=None):
  """Eval-mode logits (B, H, W, C), optionally flip-averaged (softmax mean) and resized.

  With `flip`, returns log of the mean of the softmax of the image and of its mirror image
  (argmax-equivalent to averaging probabilities). `out_size` upsamples to a label resolution
  with align_corners bilinear, as the reference upsamples to the label size.
  """
  logits, _ = model.apply(variables, images, train=False)
  logits = logits.astype(jnp.float32)
  if out_size is not None and tuple(out_size) != logits.shape[1:3]:
    logits = ops.resize_bilinear_align_corners(logits, tuple(out_size))
  if not flip:
    return logits
  flipped, _ = model.apply(variables, images[:, :, ::-1], train=False)
  flipped = flipped.astype(jnp.float32)[:, :, ::-1]
  if out_size is not None and tuple(out_size) != flipped.shape[1:3]:
    flipped = ops.resize_bilinear_align_corners(flipped, tuple(out_size))
  return jnp.log(0.5 * (_softmax(logits) + _softmax(flipped)))


def eval_step(params, batch_stats, batch, *, model, num_classes: int, flip: bool = False,
              axis_name=AXIS):
  """Confusion matrix (C, C) of one batch, summed over devices, and the predictions.

  batch: "image" (B, H, W, 3), "label" (B, Hl, Wl) int32, "mask" (B,) bool.
  """
  variables = {"params": params, "batch_stats": batch_stats}
  logits = predict_logits(model, variables, batch["image"], flip=flip,
                          out_size=batch["label"].shape[1:3])
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  cm = metrics_lib.confusion_matrix(pred, batch["label"], num_classes, mask=batch["mask"],
                                    axis_name=axis_name)
  return cm, pred


def make_p_eval_step(config, model=None, axis_name=AXIS):
  model = model or create_model(config, axis_name=None)
  step = functools.partial(eval_step, model=model, num_classes=config.num_classes,
                           flip=config.eval.flip, axis_name=axis_name)
  return jax.pmap(step, axis_name=axis_name)
