"""The optimisers: the authors' SGD as their code runs it under torch 1.0 ("reference_sgd", each
tensor updated once per entry in their parameter groups) and the textbook PyTorch SGD ("sgd"),
both with poly lr and the 10x head lr."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from data_prep.convert_torch_checkpoint import convert_state_dict
from tests import torch10_sgd
from tests import torch_reference_models as tref
from udajax import checkpoints
from udajax import configuration
from udajax import optim
from udajax import train_step as ts
from udajax.errors import CheckpointError
from udajax.errors import ConfigError
from udajax.models import DeepLabV2


def test_poly_schedule_hand_values():
  lr = optim.poly_schedule(2.5e-4, 100, 0.9)
  np.testing.assert_allclose(float(lr(0)), 2.5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(50)), 2.5e-4 * 0.5 ** 0.9, rtol=1e-6)
  np.testing.assert_allclose(float(lr(99)), 2.5e-4 * 0.01 ** 0.9, rtol=1e-5)
  assert float(lr(100)) == 0.0 and float(lr(150)) == 0.0


def test_labels_head_frozen_backbone():
  params = {"backbone": {"bn1": {"scale": 0, "bias": 0}, "conv1": {"kernel": 0}},
            "classifier": {"conv_0": {"kernel": 0, "bias": 0}}}
  labels = optim.param_labels(params, optim.RESNET_FROZEN_PREFIXES)
  assert labels["backbone"]["bn1"] == {"scale": "frozen", "bias": "frozen"}
  assert labels["backbone"]["conv1"]["kernel"] == "backbone"
  assert labels["classifier"]["conv_0"] == {"kernel": "head", "bias": "head"}


def test_matches_torch_sgd_with_param_groups():
  """Three steps of ours vs torch.optim.SGD with the reference's two param groups + a frozen one."""
  rng = np.random.default_rng(0)
  shapes = {"w": (3, 4), "head": (4,), "frozen": (2,)}
  init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
  base_lr, num_steps, wd = 0.1, 10, 5e-4

  params = {"backbone": {"w": init["w"], "bn1": {"scale": init["frozen"]}},
            "classifier": {"b": init["head"]}}
  tx, _ = optim.make_optimizer(learning_rate=base_lr, num_steps=num_steps, optimizer="sgd",
                               weight_decay=wd, frozen_prefixes=optim.RESNET_FROZEN_PREFIXES)
  opt_state = tx.init(params)
  for g in grads:
    gtree = {"backbone": {"w": g["w"], "bn1": {"scale": g["frozen"]}},
             "classifier": {"b": g["head"]}}
    updates, opt_state = tx.update(gtree, opt_state, params)
    params = optax.apply_updates(params, updates)

  tw = torch.nn.Parameter(torch.tensor(init["w"]))
  th = torch.nn.Parameter(torch.tensor(init["head"]))
  opt = torch.optim.SGD([{"params": [tw], "lr": base_lr}, {"params": [th], "lr": 10 * base_lr}],
                        lr=base_lr, momentum=0.9, weight_decay=wd)
  for i, g in enumerate(grads):
    # The reference sets the lr of each group by hand before every step (poly schedule).
    lr_i = base_lr * (1 - i / num_steps) ** 0.9
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr_i, 10 * lr_i
    tw.grad, th.grad = torch.tensor(g["w"]), torch.tensor(g["head"])
    opt.step()
  np.testing.assert_allclose(params["backbone"]["w"], tw.detach().numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(params["classifier"]["b"], th.detach().numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(params["backbone"]["bn1"]["scale"], init["frozen"])


# ------------------------------------------------- the authors' parameter groups, torch 1.0 SGD

TINY_RESNET = dict(stage_blocks=(1, 2, 1, 1), base_width=4)


def _torch_model(backbone, seed=0):
  if backbone == "resnet101":
    model = tref.TorchDeepLabResNet(5, TINY_RESNET["stage_blocks"], TINY_RESNET["base_width"])
    return torch10_sgd.freeze_stem_bn(tref.randomize_(model, seed))
  return tref.randomize_(tref.TorchDeepLabVGG(5, vgg_width=4), seed)


def _to_flax(model, backbone, values=None):
  """udajax params of `model`, optionally with each parameter's tensor replaced by values[name]."""
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # no views
  sd.update(values or {})
  kw = TINY_RESNET if backbone == "resnet101" else dict(vgg_width=4)
  return convert_state_dict(sd, backbone, **kw)[0]["params"]


def _entry_counts(groups):
  counts = {}
  for g in groups:
    for p in g["params"]:
      counts[id(p)] = counts.get(id(p), 0) + 1
  return counts


@pytest.mark.parametrize("backbone", ["resnet101", "vgg16"])
def test_entries_per_tensor_equal_the_authors_groups(backbone):
  """Each tensor's count of entries in the authors' groups (tiny models of their structure)."""
  model = _torch_model(backbone)
  counts = _entry_counts(torch10_sgd.reference_param_groups(model, 1.0))
  listed = {n: np.full(p.shape, counts.get(id(p), 0), np.float32)
            for n, p in model.named_parameters()}
  expected = jax.tree_util.tree_map(lambda a: int(a.flat[0]), _to_flax(model, backbone, listed))
  assert optim.entries_per_tensor(expected) == expected
  assert set(jax.tree_util.tree_leaves(expected)) == ({0, 1, 3, 4} if backbone == "resnet101"
                                                      else {1, 2})


def test_full_depth_entry_counts():
  """ResNet-101: 940 entries for 310 backbone tensors; VGG-16: 30 tensors listed twice."""
  torch_r101 = torch10_sgd.freeze_stem_bn(tref.TorchDeepLabResNet(19))
  one_x = torch10_sgd.reference_param_groups(torch_r101, 1.0)[0]["params"]
  assert (len(one_x), len({id(p) for p in one_x})) == (940, 310)
  one_x = torch10_sgd.reference_param_groups(tref.TorchDeepLabVGG(19), 1.0)[0]["params"]
  assert (len(one_x), len({id(p) for p in one_x})) == (60, 30)
  for backbone, entries, tensors in (("resnet101", 940, 310), ("vgg16", 60, 30)):
    model = DeepLabV2(19, backbone=backbone)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    ks = jax.tree_util.tree_leaves(optim.entries_per_tensor(shapes["params"])["backbone"])
    assert (sum(ks), sum(k > 0 for k in ks)) == (entries, tensors)


def test_entries_per_tensor_rejects_unknown_paths():
  with pytest.raises(ValueError, match="backbone/extra/kernel matches no rule"):
    optim.entries_per_tensor({"backbone": {"extra": {"kernel": 0}}})


def _run_both(backbone, optimizer, steps=3, base_lr=0.05, num_steps=5, wd=5e-4):
  """`steps` updates of udajax's optimizer and of torch-1.0 SGD on the authors' groups.

  Random gradients; the poly lr set on both groups before every step as the authors' scheduler
  does. Returns (initial, udajax final, torch final) udajax parameter trees.
  """
  model = _torch_model(backbone)
  params = _to_flax(model, backbone)
  initial = params
  groups = torch10_sgd.reference_param_groups(model, base_lr, dedup=optimizer == "sgd")
  opt = torch10_sgd.Torch10SGD(groups, momentum=0.9, weight_decay=wd)
  frozen = optim.RESNET_FROZEN_PREFIXES if backbone == "resnet101" else ()
  tx, schedule = optim.make_optimizer(learning_rate=base_lr, num_steps=num_steps,
                                      optimizer=optimizer, weight_decay=wd,
                                      frozen_prefixes=frozen)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  for i in range(steps):
    grads = {n: rng.normal(size=p.shape).astype(np.float32) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # torch: the stem BN is frozen, no gradient
      p.grad = torch.tensor(grads[n]) if p.requires_grad else None
    lr_i = base_lr * (1 - i / num_steps) ** 0.9
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr_i, 10 * lr_i
    opt.step()
    opt.zero_grad()
    np.testing.assert_allclose(float(schedule(i)), lr_i, rtol=1e-6)
    updates, opt_state = update(_to_flax(model, backbone, grads), opt_state, params)
    params = optax.apply_updates(params, updates)
  return initial, params, _to_flax(model, backbone)


def _displacement_errors(initial, ours, theirs):
  """Per leaf: max |ours - theirs| / max |theirs - initial| (0/0 = 0 for untouched leaves)."""
  def err(p0, a, b):
    moved = float(np.max(np.abs(np.asarray(b) - p0)))
    diff = float(np.max(np.abs(np.asarray(a) - b)))
    return diff / moved if moved else diff
  return jax.tree_util.tree_map(err, initial, ours, theirs)


@pytest.mark.parametrize("backbone", ["resnet101", "vgg16"])
@pytest.mark.parametrize("optimizer", ["reference_sgd", "sgd"])
def test_matches_torch10_sgd_on_the_authors_groups(backbone, optimizer):
  """reference_sgd vs torch-1.0 SGD on the authors' groups with their duplicates; sgd vs the same
  groups de-duplicated. Three poly-lr steps, both lr groups, frozen stem BN: every parameter's
  displacement agrees to 1e-6 relative."""
  initial, ours, theirs = _run_both(backbone, optimizer)
  errs = jax.tree_util.tree_leaves(_displacement_errors(initial, ours, theirs))
  assert max(errs) <= 1e-6, max(errs)
  if backbone == "resnet101":  # the frozen stem BN did not move
    for leaf in ("scale", "bias"):
      np.testing.assert_array_equal(ours["backbone"]["bn1"][leaf],
                                    initial["backbone"]["bn1"][leaf])


def test_reference_sgd_moves_listed_tensors_further():
  """The duplication is not a rounding matter: 3x/4x tensors move several times as far."""
  initial, ref, _ = _run_both("resnet101", "reference_sgd")
  _, sgd, _ = _run_both("resnet101", "sgd")
  dist = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)))  # noqa: E731
  block = ("backbone", "layer2", "block0")
  ratio = {}
  for module in ("conv2", "downsample_conv"):
    get = lambda t: t[block[0]][block[1]][block[2]][module]["kernel"]  # noqa: E731
    ratio[module] = dist(get(ref), get(initial)) / dist(get(sgd), get(initial))
  # Measured: 6.2x and 9.9x (momentum compounds the extra sub-updates across steps).
  assert 4 < ratio["conv2"] < ratio["downsample_conv"] < 15, ratio
  head = lambda t: t["classifier"]["conv0"]["kernel"]  # noqa: E731
  np.testing.assert_allclose(head(ref), head(sgd), rtol=1e-6, atol=1e-7)


def _tiny_state(optimizer):
  config = configuration.base_config()
  config.model.stage_blocks, config.model.base_width = (1, 1, 1, 1), 4
  config.train.optimizer = optimizer
  variables = ts.init_variables(config, jax.random.PRNGKey(0))
  return ts.create_train_state(config, variables, jax.random.PRNGKey(1))


def test_checkpoint_round_trip_and_optimizer_mismatch(tmp_path):
  """The new optimiser state saves and restores exactly; a checkpoint written by the other
  optimiser fails with one line that names the flag to pass."""
  state = _tiny_state("reference_sgd")
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  state = state.apply_gradients(grads=grads)  # non-zero momentum buffers, count 1
  manager = checkpoints.checkpoint_manager(str(tmp_path / "ref"))
  checkpoints.save_state(manager, 1, state, force=True)
  manager.wait_until_finished()
  restored = checkpoints.restore_state(manager, 1, _tiny_state("reference_sgd"))
  assert isinstance(restored.opt_state, optim.ReferenceSGDState)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
  assert int(restored.opt_state.count) == 1

  with pytest.raises(CheckpointError, match=r"written with --config.train.optimizer="
                     r"reference_sgd and this run uses sgd; pass --config.train.optimizer="
                     r"reference_sgd to continue that run, or use a new --workdir"):
    checkpoints.restore_state(manager, 1, _tiny_state("sgd"))
  old = checkpoints.checkpoint_manager(str(tmp_path / "old"))
  checkpoints.save_state(old, 1, _tiny_state("sgd"), force=True)
  old.wait_until_finished()
  with pytest.raises(CheckpointError, match="pass --config.train.optimizer=sgd"):
    checkpoints.restore_state(old, 1, _tiny_state("reference_sgd"))


def test_config_rejects_unknown_optimizer():
  config = configuration.base_config()
  config.train.optimizer = "adam"
  with pytest.raises(ConfigError, match=r"train.optimizer.*must be one of \('reference_sgd', "
                     r"'sgd'\)"):
    configuration.validate_config(config)
  assert configuration.OPTIMIZERS == optim.OPTIMIZERS
