"""Reproduces docs/RESULTS.md: the paper's comparison table in miniature (every row on the demo
domains over seeds), and the ablation of the paper's objectives; all with `configs/demo.py` on
CPU.

    python benchmarks/demo_results.py --seeds=0,1,2 --workdir=runs/demo_results \
        --out=runs/demo_results/RESULTS.md                        # the table: 6 runs per seed
    python benchmarks/demo_results.py --ablation --seeds=0,1,2 \
        --workdir=runs/demo_ablation --out=runs/demo_ablation/RESULTS.md   # 7 runs per seed

Per seed: one source-only run (`train.warmup_source_only_steps` steps of the demo config), then
each row continues from that model for `train.num_steps` steps with the demo's UDA settings
(same data, model, optimiser, schedule, evaluation), only the adaptation objective differs:

* the table (`ROWS`, in the order of the paper's table): source only; feature-level
  adversarial (Tsai et al.); MinEnt (ADVENT); MaxSquare IW; L_cl + L_or + L_sp; + EM. The
  baselines use their own papers' weights (`configs/baselines.py`, shared with
  configs/gta_minent.py, gta_maxsquare.py, gta_adversarial.py), the paper's rows configs/gta.py's;
* the ablation (`--ablation`, `VARIANTS`): "CE only (source only, continued)" trains on the
  source alone (no target forward), the fair baseline for the extra steps; "CE + target BN"
  runs the UDA step with every lambda = 0, so the only adaptation is BatchNorm statistics
  updated on target images; then the paper's terms one by one.

Every run keeps its work directory (`<workdir>/seed<N>/<row>/`: config, checkpoints of the final
model, TensorBoard logs). `<workdir>/results.json` holds every mIoU and the wall time of each
run, written after each run. All numbers are target-validation mIoU (%) over the classes
present.
"""

import argparse
import copy
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/udajax_jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402

from configs import baselines  # noqa: E402
from configs import demo  # noqa: E402

# The paper's table, in its order: (row, settings applied to the demo's UDA config), with each
# baseline's settings from its own paper (`configs/baselines.py`, as in the GTA5/SYNTHIA
# configs). None = the source-only model itself.
ROWS = [
    ("source only", None),
    ("Tsai et al. (feature-level adversarial)", baselines.settings("adversarial")),
    ("MinEnt (ADVENT)", baselines.settings("minent")),
    ("MaxSquare IW", baselines.settings("maxsquare")),
    ("L_cl + L_or + L_sp", {"adaptation.method": "clustering", "loss.lambda_em": 0.0}),
    ("L_cl + L_or + L_sp + EM", {"adaptation.method": "clustering"}),
]

VARIANTS = [
    # (name, mode, lambda_cl, lambda_or, lambda_sp, lambda_em); None = the demo's value
    ("CE only (source only, continued)", "source_only", 0, 0, 0, 0),
    ("CE + target BN (all lambdas 0)", "uda", 0, 0, 0, 0),
    ("+ L_cl", "uda", None, 0, 0, 0),
    ("+ L_cl + L_or", "uda", None, None, 0, 0),
    ("+ L_cl + L_or + L_sp", "uda", None, None, None, 0),
    ("+ L_cl + L_or + L_sp + EM (full)", "uda", None, None, None, None),
]


def _set(config, key, value):
  section, name = key.split(".")
  config[section][name] = value


def row_settings(ablation: bool):
  """[(name, {key: value} or None)]: the runs after the source-only one, in order."""
  if not ablation:
    return [(name, dict(s)) for name, s in ROWS[1:]]
  out = []
  for name, mode, *lambdas in VARIANTS:
    s = {"train.mode": mode}
    for key, lam in zip(("lambda_cl", "lambda_or", "lambda_sp", "lambda_em"), lambdas):
      if lam is not None:
        s[f"loss.{key}"] = float(lam)
    out.append((name, s))
  return out


def slug(name: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def run(seeds, workdir, out, ablation=False, overrides=()):
  from absl import logging
  from udajax import trainer
  logging.set_verbosity(logging.WARNING)
  base = demo.get_config()
  for item in overrides:  # "train.num_steps=20" (a quick check of the script itself)
    key, value = item.split("=", 1)
    _set(base, key, type(base[key.split(".")[0]][key.split(".")[1]])(value))
  results, times = {}, {}  # name -> list over seeds
  start = time.time()
  record = os.path.join(workdir, "results.json")
  os.makedirs(workdir, exist_ok=True)

  def done(name, value, t0):
    results.setdefault(name, []).append(value)
    times.setdefault(name, []).append(round(time.time() - t0, 1))
    with open(record, "w") as f:
      json.dump({"seeds": seeds, "mIoU": results, "wall_s": times,
                 "total_wall_s": round(time.time() - start, 1)}, f, indent=2)

  for seed in seeds:
    cfg = copy.deepcopy(base)
    cfg.seed = seed
    src_cfg = copy.deepcopy(cfg)
    src_cfg.train.mode = "source_only"
    src_cfg.train.num_steps = cfg.train.warmup_source_only_steps
    src_cfg.train.warmup_source_only_steps = 0
    src_dir = os.path.join(workdir, f"seed{seed}", "source_only")
    t0 = time.time()
    done("source only", trainer.train_and_evaluate(src_cfg, src_dir)["mIoU"], t0)
    for name, settings in row_settings(ablation):
      v = copy.deepcopy(cfg)
      v.train.warmup_source_only_steps = 0
      v.init_checkpoint = src_dir
      for key, value in settings.items():
        _set(v, key, value)
      t0 = time.time()
      r = trainer.train_and_evaluate(v, os.path.join(workdir, f"seed{seed}", slug(name)))
      done(name, r["mIoU"], t0)

  table = format_table(results, seeds, base)
  total = time.time() - start
  table += f"\n\nWall time: {total / 60:.1f} min for {sum(map(len, results.values()))} runs.\n"
  print(table)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(table)


def format_table(results, seeds, base) -> str:
  src_steps = base.train.warmup_source_only_steps
  lines = ["| run (target val mIoU, %) | " + " | ".join(f"seed {s}" for s in seeds)
           + " | mean ± std |",
           "| --- | " + " | ".join("---" for _ in seeds) + " | --- |"]
  for name, vals in results.items():
    steps = src_steps if name == "source only" else src_steps + base.train.num_steps
    lines.append(f"| {name} ({steps} steps) | " + " | ".join(f"{v:.1f}" for v in vals)
                 + f" | {np.mean(vals):.1f} ± {np.std(vals):.1f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workdir", default="runs/demo_results")
  p.add_argument("--out", default="")
  p.add_argument("--ablation", action="store_true",
                 help="the ablation of the paper's terms instead of the table's rows")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="override a demo config key, e.g. --set=train.num_steps=20")
  a = p.parse_args()
  run([int(s) for s in a.seeds.split(",")], a.workdir, a.out, ablation=a.ablation,
      overrides=a.set)


if __name__ == "__main__":
  main()
