r"""The demo's feature space before and after adaptation: the table of docs/EMBEDDINGS.md and the
picture in docs/images/.

    for s in 0 1 2; do python train.py --config=configs/demo.py --workdir=runs/demo_s$s \
        --config.seed=$s; done
    python benchmarks/embeddings_demo.py --workdirs=runs/demo_s0,runs/demo_s1,runs/demo_s2 \
        --output=runs/demo_embeddings [--num_images=32] [--image=docs/images/demo_embeddings.png]

For each work directory it measures (`udajax.embeddings.measure_checkpoint`, the same as
`python -m udajax.embeddings --which=latest`) the source-only model (`WORKDIR/source_only`) and
the adapted model (`WORKDIR`), writing `OUTPUT/<run>/{source_only,adapted}/`; then prints a
Markdown table of the scalars per seed with their means, writes it with the raw numbers to
`OUTPUT/table.md` and `OUTPUT/table.json`, and stacks the first run's two overview pictures
(source-only above adapted) into `--image`.

    python benchmarks/embeddings_demo.py --table_workdir=runs/demo_results \
        --output=runs/demo_results/embeddings

measures instead every row of `benchmarks/demo_results.py`'s table (`<workdir>/seed<N>/<row>`)
and prints one line per row: each scalar's mean ± std over the seeds.
"""

import argparse
import copy
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402

ROWS = (("orthogonality/source", "orthogonality, source: mean off-diagonal \\|cos\\| (lower = more "
         "orthogonal)"),
        ("orthogonality/target", "orthogonality, target"),
        ("alignment", "alignment: mean same-class source-vs-target cos (higher = shared)"),
        ("clustering/source/mean", "clustering ratio, source (lower = tighter)"),
        ("clustering/target/mean", "clustering ratio, target"),
        ("clustering/joint/mean", "clustering ratio, both domains pooled"),
        ("active_channels/source/mean", "active channels, source: fraction > rho (lower = "
         "sparser)"),
        ("active_channels/target/mean", "active channels, target"))


def stack_images(paths, out):
  from PIL import Image
  images = [Image.open(p).convert("RGB") for p in paths]
  width = max(im.width for im in images)
  canvas = Image.new("RGB", (width, sum(im.height for im in images)), "white")
  y = 0
  for im in images:
    canvas.paste(im, (0, y))
    y += im.height
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  canvas.save(out, optimize=True)


def write_table(table: str, records: dict, output: str, name: str) -> None:
  """Prints the Markdown `table` and writes it to `output`/`name`.md, `records` to `name`.json."""
  print(table)
  os.makedirs(output, exist_ok=True)
  with open(os.path.join(output, f"{name}.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(output, f"{name}.json"), "w") as f:
    json.dump(records, f, indent=1)


def fmt(v):
  return "n/a" if v is None else f"{v:.3f}"


def measure_table(table_workdir, output, num_images):
  """The scalars of every demo-table row: {row: [record per seed]}, and the Markdown table."""
  from benchmarks import demo_results
  from configs import demo
  from udajax import embeddings
  with open(os.path.join(table_workdir, "results.json")) as f:
    seeds = json.load(f)["seeds"]
  records = {}
  for seed in seeds:
    for row, _ in demo_results.ROWS:
      run = "source_only" if row == "source only" else demo_results.slug(row)
      config = demo.get_config()
      config.seed = seed
      records.setdefault(row, []).append(embeddings.measure_checkpoint(
          config, os.path.join(table_workdir, f"seed{seed}", run),
          os.path.join(output, f"seed{seed}", run), which="latest", num_images=num_images,
          title=f"demo seed {seed}, {row}"))
  keys = [k for k, _ in ROWS]
  lines = ["| row (mean ± std over seeds " + ",".join(map(str, seeds)) + ") | "
           + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
  for row, recs in records.items():
    cells = []
    for k in keys:
      v = [r["scalars"][k] for r in recs if r["scalars"][k] is not None]
      cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "n/a")
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return records, "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdirs", default="", help="comma-separated demo work directories")
  parser.add_argument("--table_workdir", default="",
                      help="a benchmarks/demo_results.py work directory: measure every row")
  parser.add_argument("--output", required=True)
  parser.add_argument("--num_images", type=int, default=32)
  parser.add_argument("--image", default=None, help="the before/after picture (PNG) to write")
  args = parser.parse_args()
  from absl import logging
  from configs import demo
  from udajax import embeddings
  logging.set_verbosity(logging.WARNING)
  if args.table_workdir:
    records, table = measure_table(args.table_workdir, args.output, args.num_images)
    write_table(table, records, args.output, "table_rows")
    return
  if not args.workdirs:
    parser.error("--workdirs or --table_workdir is required")
  workdirs = [w for w in args.workdirs.split(",") if w]
  records = {}  # run -> {"source_only": record, "adapted": record}
  for w in workdirs:
    run = os.path.basename(os.path.normpath(w))
    config = demo.get_config()
    with open(os.path.join(w, "config.json")) as f:
      seed = json.load(f)["seed"]
    config.seed = seed
    for name, ckpt in (("source_only", os.path.join(w, "source_only")), ("adapted", w)):
      out = os.path.join(args.output, run, name)
      title = f"demo seed {seed}, {name.replace('_', '-')} model"
      records.setdefault(run, {})[name] = embeddings.measure_checkpoint(
          copy.deepcopy(config), ckpt, out, which="latest", num_images=args.num_images,
          title=title)
  runs = list(records)
  header = ("| metric | " + " | ".join(f"{r} source-only → adapted" for r in runs)
            + " | mean source-only → adapted |")
  lines = [header, "| --- |" + " --- |" * (len(runs) + 1)]
  for key, label in ROWS:
    cells, before, after = [], [], []
    for r in runs:
      a, b = records[r]["source_only"]["scalars"][key], records[r]["adapted"]["scalars"][key]
      cells.append(f"{fmt(a)} → {fmt(b)}")
      if a is not None and b is not None:
        before.append(a)
        after.append(b)
    mean = (f"{np.mean(before):.3f} → {np.mean(after):.3f}" if before else "n/a")
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
  write_table("\n".join(lines), records, args.output, "table")
  if args.image:
    first = os.path.join(args.output, runs[0])
    stack_images([os.path.join(first, n, "embeddings.png") for n in ("source_only", "adapted")],
                 args.image)
    print(f"picture written to {args.image}")


if __name__ == "__main__":
  main()
