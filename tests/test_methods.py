"""Adaptation methods (udajax/methods): MinEnt, MaxSquare IW, feature-level adversarial.

* values and gradients against PyTorch transcriptions of ADVENT's and AdaptSegNet's code
  (tests/torch_reference_methods.py), the MinEnt ones with the global batch over 4 devices;
* the adversarial discriminator inside the train step: 4 devices == 1 device over two steps,
  then the NaN guard on the 1-device step; bfloat16 + remat, exact resume and logs in
  train_and_evaluate on the demo data (tests/test_trainer.py style, below).
"""

import functools
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import torch_reference_methods as ref
from tests.test_train_step import make_batch, per_device, rel_err, tiny_config
from udajax import configuration
from udajax import losses
from udajax import methods
from udajax import train_step as ts
from udajax.methods import adversarial
from udajax.methods import minent

N = 4
AX = "devices"


def _softmax_np(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_config_rejects_unknown_method():
  c = configuration.base_config()
  c.adaptation.method = "advent"
  with pytest.raises(configuration.ConfigError,
                     match=r"'adaptation.method' = 'advent': must be one of \('clustering', "
                           r"'minent', 'maxsquare', 'adversarial'\)"):
    configuration.validate_config(c)
  assert tuple(methods.METHODS) == configuration.METHODS


def test_minent_value_and_gradient_match_advent_over_4_devices():
  """Entropy of softmax(logits) for 4 images (6 classes): torch on the whole batch vs jax on one
  device and on 4 devices x 1 image; gradients w.r.t. the logits."""
  logits = np.random.default_rng(0).normal(0, 2, size=(N, 5, 7, 6)).astype(np.float32)
  logits[1] *= 8  # a confident image: p near 0 and 1

  t = torch.tensor(logits.transpose(0, 3, 1, 2).astype(np.float64), requires_grad=True)
  loss_t = ref.entropy_loss(torch.softmax(t, dim=1))
  loss_t.backward()
  grad_t = t.grad.numpy().transpose(0, 2, 3, 1)

  def f(x, axis_name=None):
    return minent.entropy_loss(jax.nn.softmax(x, axis=-1), axis_name=axis_name)

  v1, g1 = jax.jit(jax.value_and_grad(f))(logits)
  vn, gn = jax.pmap(jax.value_and_grad(functools.partial(f, axis_name=AX)), axis_name=AX)(
      logits.reshape(N, 1, 5, 7, 6))
  assert abs(float(v1) - loss_t.item()) <= 1e-6 * loss_t.item()
  assert rel_err(np.asarray(g1), grad_t) <= 1e-5
  np.testing.assert_allclose(np.asarray(vn), np.full(N, float(v1)), rtol=1e-6)
  assert rel_err(np.asarray(gn).reshape(logits.shape), grad_t) <= 1e-5
  assert 0.05 < loss_t.item() < 1.0


def test_maxsquare_method_is_the_iw_max_square_term():
  prob = _softmax_np(np.random.default_rng(1).normal(0, 2, size=(2, 6, 8, 5))).astype(np.float32)
  c = configuration.base_config()
  c.adaptation.method = "maxsquare"
  c.loss.lambda_em, c.loss.iw_ratio = 0.1, 0.2
  outputs = methods.StepOutputs(None, None, None, None, prob, None, None)
  out = methods.get(c).loss_terms(outputs, None, config=c, step=jnp.int32(0), axis_name=None)
  assert out.weights == {"em": 0.1} and out.state is None
  np.testing.assert_array_equal(out.terms["em"], losses.iw_max_square_loss(prob, 0.2))
  assert float(out.terms["em"]) < 0


def _disc_config(width=4, strides=(2, 2, 2, 2, 2)):
  c = configuration.base_config()
  c.adaptation.method = "adversarial"
  c.adaptation.disc_width = width
  c.adaptation.disc_strides = strides
  return c


def test_discriminator_and_both_losses_match_adaptsegnet():
  """Same weights in the JAX and the PyTorch discriminator (features 2 x 32 x 40 x 8, the
  smallest map five stride-2 layers accept): outputs, the segmenter's adversarial loss and its
  gradient w.r.t. the target features, the discriminator's loss and its parameter gradients."""
  config = _disc_config()
  rng = np.random.default_rng(2)
  fs = rng.normal(0, 1, size=(2, 32, 40, 8)).astype(np.float32)
  ft = (rng.normal(0, 1, size=(2, 32, 40, 8)) + 0.5).astype(np.float32)
  state = adversarial.init_state(config, lambda: 8, jax.random.PRNGKey(0))
  params = state["params"]
  model = adversarial.discriminator(config)

  d_t = ref.FCDiscriminator(8, ndf=4).double()
  d_t.load_flax(params)
  d_t = d_t.double()
  to_t = lambda x: torch.tensor(x.transpose(0, 3, 1, 2).astype(np.float64), requires_grad=True)  # noqa: E731
  fs_t, ft_t = to_t(fs), to_t(ft)

  out = np.asarray(jax.jit(model.apply)({"params": params}, fs))
  out_t = d_t(fs_t).detach().numpy().transpose(0, 2, 3, 1)
  assert out.shape == out_t.shape == (2, 1, 1, 1) and rel_err(out, out_t) <= 1e-5

  adv_t = ref.adversarial_loss(d_t, ft_t)
  adv_t.backward()
  adv, g_ft = jax.jit(jax.value_and_grad(
      lambda f: adversarial.bce_with_logits(model.apply({"params": params}, f), 0.0)))(ft)
  assert abs(float(adv) - adv_t.item()) <= 1e-5 * adv_t.item()
  assert rel_err(np.asarray(g_ft), ft_t.grad.numpy().transpose(0, 2, 3, 1)) <= 1e-4

  d_t.zero_grad()
  loss_dt = ref.discriminator_loss(d_t, fs_t, ft_t)
  loss_dt.backward()
  (loss_d, (acc_s, acc_t)), g = jax.jit(jax.value_and_grad(
      functools.partial(adversarial.discriminator_loss, config=config), has_aux=True))(
          params, fs, ft)
  assert abs(float(loss_d) - loss_dt.item()) <= 1e-5 * loss_dt.item()
  for i, name in enumerate(["conv1", "conv2", "conv3", "conv4", "classifier"]):
    conv = getattr(d_t, name)
    gk = conv.weight.grad.numpy().transpose(2, 3, 1, 0)
    assert rel_err(np.asarray(g[f"conv{i + 1}"]["kernel"]), gk) <= 1e-4, name
    assert rel_err(np.asarray(g[f"conv{i + 1}"]["bias"]), conv.bias.grad.numpy()) <= 1e-4, name
  out_ft = d_t(ft_t).detach().numpy()
  assert float(acc_s) == np.mean(out_t < 0) and float(acc_t) == np.mean(out_ft > 0)


def test_discriminator_too_small_feature_map_is_one_clear_error():
  config = _disc_config()
  with pytest.raises(configuration.ConfigError, match=r"'adaptation.disc_strides'.*12x24"):
    jax.eval_shape(lambda: adversarial.discriminator(config).init(  # traced, not compiled
        jax.random.PRNGKey(0), jnp.zeros((1, 12, 24, 8))))


# ------------------------------------------------------------------------------------------------
# The adversarial method in the train step.

SOURCE_HW, TARGET_HW = (88, 104), (80, 96)  # features 12x14 and 11x12


def adversarial_step_config(**model):
  c = tiny_config("uda", sync_bn=True)
  c.adaptation.method = "adversarial"
  c.adaptation.disc_width = 4
  c.adaptation.disc_strides = (2, 1, 1, 1, 1)
  c.adaptation.lambda_adv = 0.5  # large enough that the adversarial gradient matters here
  c.adaptation.disc_lr = 1e-2
  for k, v in model.items():
    c.model[k] = v
  configuration.validate_config(c)
  return c


def disc_leaves(state):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_leaves_with_path(jax.device_get(state.method_state))}


def test_adversarial_step_4_devices_equals_1_device_and_skips_a_nan_step():
  """sync_bn: the 1-device pmapped step on the 4 images is the reference. Two steps: the loss
  terms, the segmenter's params, the discriminator's params and its Adam moments. Then a third
  step of the 1-device step with a NaN target pixel is skipped: the discriminator's params and
  Adam state stay bit-identical, the step counter moves."""
  config = adversarial_step_config()
  state = ts.create_train_state(config, ts.init_variables(config, jax.random.PRNGKey(0)),
                                jax.random.PRNGKey(1))
  batch = make_batch(4, np.random.default_rng(0), source_hw=SOURCE_HW, target_hw=TARGET_HW)
  devices = jax.devices()
  step4 = ts.make_p_train_step(config, devices=devices[:4], donate=False)
  step1 = ts.make_p_train_step(config, devices=devices[:1], donate=False)
  s4 = ts.replicate(state, devices[:4])
  s1 = ts.replicate(state, devices[:1])
  for i in range(2):
    s4, m4 = step4(s4, per_device(batch))
    s1, m1 = step1(s1, per_device(batch, 1))
    for k in ("ce", "adversarial", "disc_loss", "disc_acc_source", "disc_acc_target", "total"):
      a, b = float(m4[k][0]), float(m1[k][0])
      assert abs(a - b) <= 1e-5 * abs(b) + 1e-7, (i, k, a, b)
    assert float(m4["finite"][0]) == 1.0
  # The NaN guard (the 1-device step, already compiled): a non-finite target pixel makes the
  # adversarial terms non-finite; the update is skipped and leaves the discriminator as it was.
  bad = make_batch(4, np.random.default_rng(5), source_hw=SOURCE_HW, target_hw=TARGET_HW)
  bad["target_image"][1, 3, 4, 0] = np.nan
  skipped, m = step1(s1, per_device(bad, 1))
  assert float(m["finite"][0]) == 0.0 and int(ts.unreplicate(skipped).step) == 3
  after, before = disc_leaves(ts.unreplicate(skipped)), disc_leaves(ts.unreplicate(s1))
  for k in before:  # params, Adam moments and Adam's count
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  a, b, init = ts.unreplicate(s4), ts.unreplicate(s1), disc_leaves(state)
  da, db = disc_leaves(a), disc_leaves(b)
  assert da.keys() == db.keys() and len(da) == 10 * 3 + 1  # params, mu, nu (+ count)
  errors = {}
  for k in db:
    if k.endswith(".count"):
      assert int(da[k]) == int(db[k]) == 2
      continue
    base = init[k] if "params" in k else 0
    assert np.any(db[k] != base), k
    errors[k] = float(rel_err(da[k] - base, db[k] - base))
  # Adam's first and second moments are sums of gradients (squared): as tight as the segmenter
  # (measured <= 9e-5). Its update m / (sqrt(v) + eps) divides each entry by its own gradient
  # size, which magnifies float32 summation-order differences of near-zero gradient entries to
  # the order of the lr: measured <= 4e-3 of the largest update on the params.
  assert all(e <= 1e-4 for k, e in errors.items() if "params" not in k), errors
  assert all(e <= 1e-2 for k, e in errors.items() if "params" in k), errors
  pa, pb = jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)
  p0 = jax.tree_util.tree_leaves(state.params)
  # Segmenter: per-leaf update within 5e-4 of the leaf's largest update (measured <= 1.04e-4,
  # on a BN bias whose update is ~1e-5 after two steps).
  for x, y, z in zip(pa, pb, p0):
    if np.any(y != z):
      assert rel_err(np.asarray(x) - z, np.asarray(y) - z) <= 5e-4


# (config, paper config it differs from, method, the keys that differ besides adaptation.method)
BASELINES = [
    ("gta_minent", "gta", "minent", {"adaptation.lambda_ent": 1e-3}),
    ("gta_maxsquare", "gta", "maxsquare", {"loss.lambda_em": 0.1, "loss.iw_ratio": 0.2}),
    ("gta_adversarial", "gta", "adversarial", {"adaptation.lambda_adv": 1e-3}),
    ("synthia_minent", "synthia", "minent", {"adaptation.lambda_ent": 1e-3}),
    ("synthia_maxsquare", "synthia", "maxsquare", {"loss.lambda_em": 0.1, "loss.iw_ratio": 0.2}),
    ("synthia_adversarial", "synthia", "adversarial", {"adaptation.lambda_adv": 1e-3}),
]


@pytest.mark.parametrize("name,paper,method,keys", BASELINES)
def test_baseline_configs_differ_from_the_paper_config_only_in_the_objective(name, paper, method,
                                                                             keys):
  import importlib
  c = importlib.import_module(f"configs.{name}").get_config()
  configuration.validate_config(c)
  p = importlib.import_module(f"configs.{paper}").get_config()
  flat_c = flax.traverse_util.flatten_dict(c.to_dict(), sep=".")
  flat_p = flax.traverse_util.flatten_dict(p.to_dict(), sep=".")
  diff = {k: flat_c[k] for k in flat_c if flat_c[k] != flat_p[k]}
  assert diff == {"adaptation.method": method, **{k: v for k, v in keys.items()
                                                   if flat_p[k] != v}}, diff
  assert p.adaptation.method == "clustering"
  assert c.adaptation.disc_lr == 1e-4 and tuple(c.adaptation.disc_betas) == (0.9, 0.99)


def test_adversarial_training_logs_and_resumes_exactly(tmp_path, tmp_path_factory):
  """train_and_evaluate on the demo data (tiny model in bfloat16 with remat, 4 devices x 1
  image): the discriminator's loss and per-domain accuracy are logged; the discriminator stays
  float32 and every one of its tensors got Adam updates and moved; a run resumed from the
  uninterrupted run's step-2 checkpoint (copied into a new work directory) ends with the same
  segmenter params and the same discriminator params and Adam state as the uninterrupted run
  (bit for bit).
  Stopping a run at `train.stop_step` is tested in tests/test_trainer.py."""
  from tests.test_trainer import event_tags, tiny_demo_config
  from tests import train_cli
  from udajax import checkpoints
  from udajax import trainer
  data_dir = train_cli.demo_data_dir(tmp_path_factory)  # the session's one demo build

  def config(**train):
    c = tiny_demo_config(data_dir, num_steps=4, checkpoint_every_steps=2, log_every_steps=1,
                         **train)
    c.eval.every_steps = 4
    c.eval.num_images_to_log = 0
    c.eval.split = "validation[:8]"  # the eval is not what this test is about (bf16 is slow on CPU)
    c.adaptation.method = "adversarial"
    c.adaptation.disc_width = 4
    c.adaptation.disc_strides = (2, 1, 1, 1, 1)  # demo features are 12x24
    c.model.dtype, c.model.remat = "bfloat16", True  # the discriminator stays float32
    return c

  def final_state(workdir):
    manager = checkpoints.checkpoint_manager(workdir, 2, read_only=True)
    return trainer.initial_state(config(), manager)

  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  trainer.train_and_evaluate(config(), full)
  for name in ["train/ce", "train/adversarial", "train/disc_loss", "train/disc_acc_source",
               "train/disc_acc_target", "train/total"]:
    assert name in event_tags(full), name
  shutil.copytree(os.path.join(full, "checkpoints", "2"), os.path.join(part, "checkpoints", "2"))
  trainer.train_and_evaluate(config(), part)
  assert sorted(train_cli.scalars(part)["train/disc_loss"]) == [3, 4]  # resumed, not restarted
  a, b = final_state(full), final_state(part)
  assert int(a.step) == int(b.step) == 4
  la, lb = disc_leaves(a), disc_leaves(b)
  assert len(la) == 31 and int(la[next(k for k in la if k.endswith(".count"))]) == 4
  assert all(v.dtype in (np.float32, np.int32) for v in la.values())
  moments = [k for k in la if "opt_state" in k and not k.endswith(".count")]
  assert len(moments) == 20 and all(np.any(la[k] != 0) for k in moments), moments
  fresh = trainer.initial_state(config(), checkpoints.checkpoint_manager(str(tmp_path / "new"), 2))
  init = disc_leaves(fresh)  # the state a run starts from: every discriminator param moved
  assert all(np.any(la[k] != init[k]) for k in la if "params" in k)
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(x, y)
