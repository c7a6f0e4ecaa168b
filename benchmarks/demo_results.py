"""Reproduces docs/RESULTS.md: the demo's source-only vs adapted target mIoU over seeds, and an
ablation of the adaptation objectives, all with `configs/demo.py` on 2 CPU cores.

    python benchmarks/demo_results.py --seeds=0,1,2 --workdir=runs/demo_results \
        --out=runs/demo_results/RESULTS.md

Per seed: one source-only run (`train.warmup_source_only_steps` steps of the demo config), then
each variant continues from that model for `train.num_steps` steps with the demo's UDA settings
and only the listed loss weights non-zero. "CE only (source only, continued)" trains on the
source alone (no target forward), the fair baseline for the extra steps; "CE + target BN" runs
the UDA step with every lambda = 0, so the only adaptation is BatchNorm statistics updated on
target images. All numbers are target-validation mIoU (%) over the classes present.
"""

import argparse
import copy
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/udajax_jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402

from configs import demo  # noqa: E402

VARIANTS = [
    # (name, mode, lambda_cl, lambda_or, lambda_sp, lambda_em)
    ("CE only (source only, continued)", "source_only", 0, 0, 0, 0),
    ("CE + target BN (all lambdas 0)", "uda", 0, 0, 0, 0),
    ("+ L_cl", "uda", None, 0, 0, 0),
    ("+ L_cl + L_or", "uda", None, None, 0, 0),
    ("+ L_cl + L_or + L_sp", "uda", None, None, None, 0),
    ("+ L_cl + L_or + L_sp + EM (full)", "uda", None, None, None, None),
]


def run(seeds, workdir, out):
  from absl import logging
  from udajax import trainer
  logging.set_verbosity(logging.WARNING)
  base = demo.get_config()
  results = {}  # name -> list of mIoU over seeds
  for seed in seeds:
    cfg = copy.deepcopy(base)
    cfg.seed = seed
    src_cfg = copy.deepcopy(cfg)
    src_cfg.train.mode = "source_only"
    src_cfg.train.num_steps = cfg.train.warmup_source_only_steps
    src_cfg.train.warmup_source_only_steps = 0
    src_dir = os.path.join(workdir, f"seed{seed}", "source_only")
    r = trainer.train_and_evaluate(src_cfg, src_dir)
    results.setdefault("source only", []).append(r["mIoU"])
    for name, mode, *lambdas in VARIANTS:
      v = copy.deepcopy(cfg)
      v.train.mode = mode
      v.train.warmup_source_only_steps = 0
      v.init_checkpoint = src_dir
      for key, lam in zip(("lambda_cl", "lambda_or", "lambda_sp", "lambda_em"), lambdas):
        if lam is not None:
          v.loss[key] = float(lam)
      slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
      r = trainer.train_and_evaluate(v, os.path.join(workdir, f"seed{seed}", slug))
      results.setdefault(name, []).append(r["mIoU"])
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"seeds": seeds, "mIoU": results}, f, indent=2)

  src_steps = base.train.warmup_source_only_steps
  lines = ["| run (target val mIoU, %) | " + " | ".join(f"seed {s}" for s in seeds)
           + " | mean ± std |",
           "| --- | " + " | ".join("---" for _ in seeds) + " | --- |"]
  for name, vals in results.items():
    steps = src_steps if name == "source only" else src_steps + base.train.num_steps
    lines.append(f"| {name} ({steps} steps) | " + " | ".join(f"{v:.1f}" for v in vals)
                 + f" | {np.mean(vals):.1f} ± {np.std(vals):.1f} |")
  table = "\n".join(lines)
  print(table)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(table + "\n")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workdir", default="runs/demo_results")
  p.add_argument("--out", default="")
  a = p.parse_args()
  run([int(s) for s in a.seeds.split(",")], a.workdir, a.out)


if __name__ == "__main__":
  main()
