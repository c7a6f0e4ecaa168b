"""The paper's baselines, each with its own paper's settings, applied on top of a udajax config:
`configs/{gta,synthia}_{minent,maxsquare,adversarial}.py` and the demo table
(`benchmarks/demo_results.py`) share them. The source of every value is in the docstring of
`configs/gta_<method>.py`.
"""

SETTINGS = {
    # ADVENT's cfg.TRAIN.LAMBDA_ENT_MAIN.
    "minent": {"adaptation.lambda_ent": 1e-3},
    # MaxSquare's "MaxSquare+IW" command: lambda_target 0.1, IW ratio 0.2.
    "maxsquare": {"loss.lambda_em": 0.1, "loss.iw_ratio": 0.2},
    # AdaptSegNet: LAMBDA_ADV_TARGET2, LEARNING_RATE_D, Adam betas.
    "adversarial": {"adaptation.lambda_adv": 1e-3, "adaptation.disc_lr": 1e-4,
                    "adaptation.disc_betas": (0.9, 0.99)},
}


def settings(method: str) -> dict:
  """{"section.key": value} of `method`, `adaptation.method` included."""
  return {"adaptation.method": method, **SETTINGS[method]}


def apply(config, method: str):
  """`config` with `method` and its settings set (in place); returns it."""
  for key, value in settings(method).items():
    section, name = key.split(".")
    config[section][name] = value
  return config
