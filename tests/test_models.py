"""DeepLabV2 (udajax.models) against an independent PyTorch implementation, plus shapes and BN.

Weights go torch → .pth file → data_prep converter → Flax, so these tests also cover the
converter on full-depth nets. Full-size nets run eagerly (no jit): one full ResNet-101 forward
per mode costs a few seconds on CPU instead of a ~20 s compile.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from data_prep.convert_torch_checkpoint import convert_checkpoint, convert_state_dict
from tests import torch_reference_models as tref
from udajax import batch_norm
from udajax import compiles
from udajax import images as images_lib
from udajax import models
from udajax.models import DeepLabV2

EVAL_TOL = 1e-4
TRAIN_TOL = 2e-3


def relerr(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def torch_run(model, images_nhwc, train):
  """Runs the torch model on NHWC numpy images; returns NHWC (logits, features)."""
  model.train(train)
  with torch.no_grad():
    logits, feats = model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
  return logits.numpy().transpose(0, 2, 3, 1), feats.numpy().transpose(0, 2, 3, 1)


def images(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32) * 50.0


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("size", [(64, 64), (97, 161), (5, 6), (33, 2)])
def test_max_pool_ceil_matches_torch(size):
  x = np.random.RandomState(1).randn(2, *size, 3).astype(np.float32)
  ours = np.asarray(models.max_pool_ceil(jnp.asarray(x), 3, 2, 1))
  pool = torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
  theirs = pool(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  assert ours.shape == theirs.shape
  np.testing.assert_array_equal(ours, theirs)
  if size == (64, 64):
    assert ours.shape[1:3] == (33, 33)


def test_normalize_images():
  rgb = np.random.RandomState(0).randint(0, 256, (2, 5, 7, 3)).astype(np.uint8)
  out = images_lib.normalize(rgb)
  assert isinstance(out, np.ndarray) and out.dtype == np.float32
  expected = rgb[..., ::-1].astype(np.float32) - np.array(
      [104.00698793, 116.66876762, 122.67891434], np.float32)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(images_lib.denormalize(out), rgb)
  np.testing.assert_allclose(images_lib.IMAGE_MEAN_BGR, [104.00698793, 116.66876762, 122.67891434])


def test_batchnorm_matches_torch_train_and_eval():
  rng = np.random.RandomState(0)
  x = (rng.randn(3, 5, 7, 6) * 3 + 2).astype(np.float32)
  torch.manual_seed(0)  # the values must not depend on which tests ran before in this process
  bn_t = torch.nn.BatchNorm2d(6)
  with torch.no_grad():
    bn_t.weight.uniform_(0.5, 1.5)
    bn_t.bias.normal_()
    bn_t.running_mean.normal_()
    bn_t.running_var.uniform_(0.5, 2.0)
  variables = {"params": {"scale": bn_t.weight.detach().numpy().copy(),
                          "bias": bn_t.bias.detach().numpy().copy()},
               "batch_stats": {"mean": bn_t.running_mean.numpy().copy(),
                               "var": bn_t.running_var.numpy().copy()}}
  bn = batch_norm.BatchNorm()
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  bn_t.eval()
  y_eval = bn.apply(variables, jnp.asarray(x), train=False)
  np.testing.assert_allclose(y_eval, bn_t(xt).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
  bn_t.train()
  y_train, state = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  ref = bn_t(xt).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(y_train, ref, atol=1e-5)
  # Running variance takes the *unbiased* batch variance, like PyTorch.
  # The update 0.9 * old + 0.1 * batch_stat cancels where old and batch_stat have opposite
  # signs, so its float32 rounding is bounded relative to the operands (of order 1-10 here),
  # not to the result: ~1 ulp of the operands, 1e-6 absolute, on top of rtol.
  np.testing.assert_allclose(state["batch_stats"]["mean"], bn_t.running_mean.numpy(),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["var"], bn_t.running_var.numpy(),
                             rtol=1e-6, atol=1e-6)


def test_synchronised_batchnorm_under_pmap_equals_global_batch():
  n = jax.local_device_count()
  assert n >= 2, "conftest forces 4 CPU devices"
  x = np.random.RandomState(0).randn(n * 2, 3, 4, 5).astype(np.float32) * 2 + 1
  bn_sync = batch_norm.BatchNorm(axis_name="batch")
  variables = batch_norm.BatchNorm().init(jax.random.key(0), jnp.asarray(x[:2]), train=False)
  single, s_state = batch_norm.BatchNorm().apply(variables, jnp.asarray(x), train=True,
                                             mutable=["batch_stats"])
  rep = jax.tree_util.tree_map(lambda a: jnp.stack([a] * n), variables)
  fn = jax.pmap(lambda v, xb: bn_sync.apply(v, xb, train=True, mutable=["batch_stats"]),
                axis_name="batch")
  multi, m_state = fn(rep, jnp.asarray(x.reshape(n, 2, 3, 4, 5)))
  np.testing.assert_allclose(np.asarray(multi).reshape(x.shape), single, atol=1e-5)
  for k in ("mean", "var"):
    for d in range(n):
      np.testing.assert_allclose(m_state["batch_stats"][k][d], s_state["batch_stats"][k],
                                 rtol=1e-5)


def test_batchnorm_gradients_match_torch():
  rng = np.random.RandomState(1)
  x = (rng.randn(2, 5, 7, 6) * 3 + 2).astype(np.float32)
  w = rng.randn(2, 5, 7, 6).astype(np.float32)
  scale, bias = rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.randn(6).astype(np.float32)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": np.zeros(6, np.float32), "var": np.ones(6, np.float32)}}

  def loss(params, x):
    y, _ = batch_norm.BatchNorm().apply({**variables, "params": params}, x, train=True,
                                    mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * w)

  d_params, dx = jax.grad(loss, argnums=(0, 1))(variables["params"], jnp.asarray(x))
  bn_t = torch.nn.BatchNorm2d(6).train()
  with torch.no_grad():
    bn_t.weight.copy_(torch.from_numpy(scale))
    bn_t.bias.copy_(torch.from_numpy(bias))
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_(True)
  (torch.sin(bn_t(xt)) * torch.from_numpy(w.transpose(0, 3, 1, 2))).sum().backward()
  assert relerr(dx, xt.grad.numpy().transpose(0, 2, 3, 1)) < 1e-5
  assert relerr(d_params["scale"], bn_t.weight.grad.numpy()) < 1e-5
  assert relerr(d_params["bias"], bn_t.bias.grad.numpy()) < 1e-5


def _plain_batch_norm(x, scale, bias, axis_name=None):
  """The forward formula, differentiated by JAX (what `batch_norm_train`'s backward replaces)."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  mean = jax.lax.pmean(mean, axis_name) if axis_name else mean
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  var = jax.lax.pmean(var, axis_name) if axis_name else var
  return (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias, mean, var


def test_batch_norm_train_backward_equals_autodiff_including_statistics_and_sync():
  n = jax.local_device_count()
  rng = np.random.RandomState(2)
  x = (rng.randn(n * 2, 3, 4, 5) * 2 + 1).astype(np.float32)
  w = rng.randn(*x.shape).astype(np.float32)
  a, b = rng.randn(5).astype(np.float32), rng.randn(5).astype(np.float32)
  scale, bias = rng.uniform(0.5, 1.5, 5).astype(np.float32), rng.randn(5).astype(np.float32)

  def loss(bn, axis_name=None):
    # The statistics feed the loss too. Under pmap each device adds 1/n of their term, so that
    # the devices' losses sum to the single-device loss.
    parts = n if axis_name else 1

    def f(x, scale, bias, w):
      y, mean, var = bn(x, scale, bias, axis_name)
      return jnp.sum(jnp.sin(y) * w) + (jnp.sum(mean * a) + jnp.sum(var * b)) / parts
    return jax.grad(f, argnums=(0, 1, 2))

  ours_bn = lambda x, s, c, ax: batch_norm.batch_norm_train(x, s, c, 1e-5, ax)  # noqa: E731
  ours = loss(ours_bn)(x, scale, bias, w)
  plain = loss(_plain_batch_norm)(x, scale, bias, w)
  for o, p in zip(ours, plain):
    assert relerr(o, p) < 1e-5
  # Synchronised over n devices: each device's dx is its slice of the global-batch dx, and the
  # devices' scale/bias gradients sum to the global ones (the trainer sums them).
  shard = lambda v: v.reshape(n, 2, *v.shape[1:])  # noqa: E731
  p_grad = jax.pmap(loss(ours_bn, "batch"), axis_name="batch", in_axes=(0, None, None, 0))
  dx, d_scale, d_bias = p_grad(shard(x), scale, bias, shard(w))
  assert relerr(np.asarray(dx).reshape(x.shape), plain[0]) < 1e-5
  assert relerr(np.sum(d_scale, 0), plain[1]) < 1e-5
  assert relerr(np.sum(d_bias, 0), plain[2]) < 1e-5


def test_batch_norm_train_bfloat16_input_keeps_its_dtype_and_float32_maths():
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, 4, 5, 6) * 2 + 1, jnp.bfloat16)
  g = jnp.asarray(rng.randn(2, 4, 5, 6), jnp.float32)
  scale, bias = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32), jnp.zeros(6, jnp.float32)
  f = lambda bn: lambda x: jnp.sum(bn(x, scale, bias)[0] * g)  # noqa: E731
  dx = jax.grad(f(lambda x, s, b: batch_norm.batch_norm_train(x, s, b, 1e-5, None)))(x)
  ref = jax.grad(f(lambda x, s, b: _plain_batch_norm(x.astype(jnp.float32), s, b)))(x)
  assert dx.dtype == jnp.bfloat16 and ref.dtype == jnp.bfloat16
  # Both compute in float32 from the same bf16 input; only the final rounding to bf16 (2^-8
  # relative) and float32 summation order differ.
  assert relerr(dx, ref) < 1e-2


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


def test_tiny_shapes_and_tree_layout():
  """Shapes and variable layout via eval_shape (no compile: jax RNG compiles slowly on CPU)."""
  m = DeepLabV2(5, stage_blocks=(1, 1, 1, 1), base_width=8)
  x = jax.ShapeDtypeStruct((2, 97, 161, 3), jnp.float32)
  v = jax.eval_shape(m.init, jax.random.key(0), x)
  logits, feats = jax.eval_shape(m.apply, v, x)
  assert logits.shape == (2, 97, 161, 5) and feats.shape == (2, 13, 21, 256)
  assert logits.dtype == jnp.float32 and feats.dtype == jnp.float32
  p, s = _shapes(v["params"]), _shapes(v["batch_stats"])
  assert set(p) == {"backbone", "classifier"} and set(s) == {"backbone"}
  assert p["backbone"]["conv1"] == {"kernel": (7, 7, 3, 8)}
  assert p["backbone"]["bn1"] == {"scale": (8,), "bias": (8,)}
  assert s["backbone"]["bn1"] == {"mean": (8,), "var": (8,)}
  assert p["classifier"] == {f"conv{i}": {"kernel": (3, 3, 256, 5), "bias": (5,)} for i in (0, 1)}
  assert set(p["backbone"]) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
  assert set(p["backbone"]["layer3"]["block0"]) == {
      "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"}
  v4 = jax.eval_shape(DeepLabV2(5, stage_blocks=(1, 1, 1, 1), base_width=8,
                                aspp_dilations=(6, 12, 18, 24)).init, jax.random.key(0), x)
  assert set(v4["params"]["classifier"]) == {"conv0", "conv1", "conv2", "conv3"}
  vm = DeepLabV2(5, backbone="vgg16", vgg_width=8)
  vv = jax.eval_shape(vm.init, jax.random.key(0), x)
  assert set(vv) == {"params"}
  assert _shapes(vv["params"]["backbone"]["fc7"]) == {"kernel": (3, 3, 128, 128), "bias": (128,)}
  logits, feats = jax.eval_shape(vm.apply, vv, x)
  assert logits.shape == (2, 97, 161, 5) and feats.shape == (2, 12, 20, 128)
  with pytest.raises(ValueError, match="unknown backbone"):
    jax.eval_shape(DeepLabV2(5, backbone="resnet50").init, jax.random.key(0), x)


def test_classifier_init_follows_reference():
  """ASPP weights N(0, 0.01²); biases keep PyTorch's default U(±1/sqrt(9·Cin))."""
  head = models.ASPP(7, (6, 12))
  v = jax.jit(head.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))["params"]
  for name in ("conv0", "conv1"):
    k, b = np.asarray(v[name]["kernel"]), np.asarray(v[name]["bias"])
    assert k.shape == (3, 3, 64, 7) and abs(k.std() - 0.01) < 0.001 and abs(k.mean()) < 0.001
    assert np.all(np.abs(b) <= 1 / np.sqrt(9 * 64)) and np.unique(b).size == 7


def test_init_compiled_at_llvm_o1_equals_the_default_compile():
  """`compiles.jit_init` (XLA CPU at LLVM -O1) gives the parameters and BN statistics of a
  default-options compile bit for bit (every initialiser kind: normal, uniform, ones, zeros)."""
  model = DeepLabV2(19, stage_blocks=(1, 1, 1, 1), base_width=4)
  args = (jax.random.PRNGKey(3), jnp.zeros((1, 64, 64, 3), jnp.float32))
  init = functools.partial(model.init, train=False)
  assert compiles.INIT_COMPILER_OPTIONS["cpu"] == {"xla_backend_optimization_level": 1}
  cheap = jax.tree_util.tree_leaves_with_path(compiles.jit_init(init, *args))
  default = jax.tree_util.tree_leaves(jax.jit(init).lower(*args).compile()(*args))
  assert len(cheap) == len(default) == 89
  for (path, a), b in zip(cheap, default, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_tiny_remat_bf16_and_four_branch_head_vs_torch(tmp_path):
  """Tiny ResNet with all four ASPP branches against torch; remat and bfloat16 variants run."""
  tm = tref.randomize_(tref.TorchDeepLabResNet(4, (1, 2, 1, 1), 8, used_branches=4), seed=3)
  path = tref.save_layout(tm, str(tmp_path / "tiny.pth"), "bare")
  v = convert_checkpoint(path, "resnet101", stage_blocks=(1, 2, 1, 1), base_width=8,
                         aspp_branches=4)
  x = images((2, 45, 37, 3))
  ref_logits, ref_feats = torch_run(tm, x, train=False)
  kw = dict(stage_blocks=(1, 2, 1, 1), base_width=8, aspp_dilations=(6, 12, 18, 24))
  logits, feats = jax.jit(DeepLabV2(4, **kw).apply)(v, jnp.asarray(x))
  assert relerr(logits, ref_logits) < EVAL_TOL and relerr(feats, ref_feats) < EVAL_TOL

  def train_forward(model):
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        v, jnp.asarray(x))

  (logits_r, _), state_r = train_forward(DeepLabV2(4, remat=True, **kw))
  (logits_p, _), state_p = train_forward(DeepLabV2(4, **kw))
  np.testing.assert_allclose(logits_r, logits_p, rtol=1e-5, atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), state_r, state_p)
  logits_bf, _ = jax.jit(DeepLabV2(4, dtype=jnp.bfloat16, **kw).apply)(v, jnp.asarray(x))
  assert logits_bf.dtype == jnp.float32 and relerr(logits_bf, ref_logits) < 0.1


# ----------------------------------------------------------------------------- full depth


@pytest.fixture(scope="module")
def resnet101_pair(tmp_path_factory):
  tm = tref.randomize_(tref.TorchDeepLabResNet(19), seed=0)
  path = tref.save_layout(tm, str(tmp_path_factory.mktemp("r101") / "ref.pth"), "reference")
  return tm, convert_checkpoint(path, "resnet101", num_classes=19)


def test_resnet101_full_depth_matches_torch(resnet101_pair):
  tm, variables = resnet101_pair
  assert set(variables["params"]) == {"backbone", "classifier"}
  model = DeepLabV2(19)
  x = images((2, 97, 161, 3), seed=5)

  ref_logits, ref_feats = torch_run(tm, x, train=False)
  logits, feats = model.apply(variables, jnp.asarray(x), train=False)
  assert logits.shape == (2, 97, 161, 19) and feats.shape == (2, 13, 21, 2048)
  errs = {"eval_logits": relerr(logits, ref_logits), "eval_features": relerr(feats, ref_feats)}

  ref_logits, ref_feats = torch_run(tm, x, train=True)  # updates torch running stats
  (logits, feats), state = model.apply(variables, jnp.asarray(x), train=True,
                                       mutable=["batch_stats"])
  errs["train_logits"] = relerr(logits, ref_logits)
  errs["train_features"] = relerr(feats, ref_feats)
  updated, _ = convert_state_dict({k: v.numpy() for k, v in tm.state_dict().items()},
                                  "resnet101")
  flat_ours = dict(jax.tree_util.tree_leaves_with_path(state["batch_stats"]))
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(updated["batch_stats"]))
  # stem + 33·3 + 4 projections
  assert flat_ours.keys() == flat_ref.keys() and len(flat_ours) == 2 * 104
  errs["running_stats"] = max(relerr(flat_ours[k], flat_ref[k]) for k in flat_ref)
  # The initial statistics were random, so a non-update would show up clearly.
  assert relerr(state["batch_stats"]["backbone"]["bn1"]["var"],
                variables["batch_stats"]["backbone"]["bn1"]["var"]) > 1e-2
  print("ResNet-101 relative errors:", errs)
  assert errs["eval_logits"] < EVAL_TOL and errs["eval_features"] < EVAL_TOL, errs
  assert max(errs["train_logits"], errs["train_features"], errs["running_stats"]) < TRAIN_TOL, errs


@pytest.fixture(scope="module")
def vgg16_pair(tmp_path_factory):
  tm = tref.randomize_(tref.TorchDeepLabVGG(19), seed=1)
  path = tref.save_layout(tm, str(tmp_path_factory.mktemp("vgg") / "ref.pth"), "reference")
  return tm, convert_checkpoint(path, "vgg16")


def test_vgg16_full_matches_torch_reference_layout(vgg16_pair):
  tm, variables = vgg16_pair
  assert set(variables) == {"params"} and set(variables["params"]) == {"backbone", "classifier"}
  x = images((2, 41, 53, 3), seed=6)
  ref_logits, ref_feats = torch_run(tm, x, train=False)
  model = DeepLabV2(19, backbone="vgg16")
  logits, feats = model.apply(variables, jnp.asarray(x), train=False)
  assert feats.shape == (2, 5, 6, 1024) and logits.shape == (2, 41, 53, 19)
  errs = (relerr(logits, ref_logits), relerr(feats, ref_feats))
  (logits_t, _), _ = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  print("VGG-16 relative errors (logits, features):", errs)
  assert max(errs) < EVAL_TOL, errs
  np.testing.assert_array_equal(logits_t, logits)  # no BN / dropout: train == eval


def test_vgg16_torchvision_layout(vgg16_pair, tmp_path):
  tm, ref = vgg16_pair
  tv = convert_checkpoint(tref.save_layout(tm, str(tmp_path / "tv.pth"), "torchvision"), "vgg16")
  assert set(tv["params"]) == {"backbone"}  # no classifier in torchvision's file
  for name in models.VGG_CONV_NAMES:
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(tv["params"]["backbone"][name][leaf],
                                    ref["params"]["backbone"][name][leaf])
  # fc6/fc7 are not in torchvision's vgg16: freshly initialised with the right shapes.
  for name, cin in (("fc6", 512), ("fc7", 1024)):
    k = tv["params"]["backbone"][name]["kernel"]
    assert k.shape == (3, 3, cin, 1024)
    assert np.abs(k).max() <= 1 / np.sqrt(9 * cin) + 1e-7 and k.std() > 0
  x = images((1, 41, 53, 3), seed=7)
  full = {"params": {**tv["params"], "classifier": ref["params"]["classifier"]}}
  logits, feats = DeepLabV2(19, backbone="vgg16").apply(full, jnp.asarray(x))
  assert np.all(np.isfinite(logits)) and feats.shape == (1, 5, 6, 1024)
