"""The optimiser follows PyTorch SGD (momentum, weight decay), poly lr and the 10x head lr."""

import numpy as np
import optax
import torch

from udajax import optim


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
  tx, _ = optim.make_optimizer(learning_rate=base_lr, num_steps=num_steps, weight_decay=wd,
                               frozen_prefixes=optim.RESNET_FROZEN_PREFIXES)
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
