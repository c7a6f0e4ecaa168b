r"""Builds the udajax TFDS datasets (ArrayRecord files for random-access input pipelines).

  python data_prep/build_datasets.py gta5 --manual_dir=/data/GTA5 [--config=1280x720|full]
  python data_prep/build_datasets.py synthia --manual_dir=/data/SYNTHIA [--config=1280x760|full]
  python data_prep/build_datasets.py cityscapes --manual_dir=/data/cityscapes \
      [--config=1024x512|full]
  python data_prep/build_datasets.py demo                      # both demo configs, no download
Common flags: --data_dir (default: TFDS's, i.e. $TFDS_DATA_DIR or ~/tensorflow_datasets),
--skip_corrupt (skip unreadable files and report their count instead of failing),
--num_workers (decode/resize threads), --config=all (every config of the dataset).

Prints a progress bar per split and a summary: examples written per split, files skipped,
labels resized to their image's size, bytes written.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATASETS = {"gta5": "gta5", "synthia": "synthia", "cityscapes": "cityscapes", "demo": "udajax_demo"}
DEFAULT_CONFIGS = {"gta5": "1280x720", "synthia": "1280x760", "cityscapes": "1024x512",
                   "udajax_demo": "all"}


def _dir_bytes(path):
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _human(n):
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024.0


def build(name, config, *, manual_dir=None, data_dir=None, skip_corrupt=False, num_workers=None):
  """Builds one dataset config; returns a summary dict."""
  from udajax import datasets  # pylint: disable=g-import-not-at-top
  from udajax.datasets.common import tfds  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if name != "udajax_demo":
    if not manual_dir:
      raise SystemExit(f"{name} needs --manual_dir.\n"
                       f"{datasets.builder_class(name).MANUAL_DOWNLOAD_INSTRUCTIONS}")
    if not os.path.isdir(manual_dir):
      raise SystemExit(f"--manual_dir {manual_dir} is not a directory.\n"
                       f"{datasets.builder_class(name).MANUAL_DOWNLOAD_INSTRUCTIONS}")
    kwargs = dict(skip_corrupt=skip_corrupt, num_workers=num_workers)
  builder = datasets.get_builder(name, config, data_dir, **kwargs)
  start = time.time()
  if builder.is_prepared():
    print(f"{name}/{config}: already built in {builder.data_dir} (delete it to rebuild)")
    built = False
  else:
    dl_config = tfds.download.DownloadConfig(
        manual_dir=os.path.abspath(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=dl_config)
    built = True
  splits = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
  stats = builder.build_stats.as_dict() if built else dict(builder.info.metadata or {})
  summary = {
      "dataset": name, "config": config, "dir": str(builder.data_dir), "splits": splits,
      "skipped": {s: c.get("skipped", 0) for s, c in stats.items() if isinstance(c, dict)},
      "label_resized": {s: c.get("label_resized", 0) for s, c in stats.items()
                        if isinstance(c, dict)},
      "bytes": _dir_bytes(os.fspath(builder.data_dir)), "seconds": time.time() - start,
      "skipped_files": list(getattr(builder.build_stats, "skipped_files", [])) if built else [],
  }
  return summary


def print_summary(s):
  print(f"\n== {s['dataset']}/{s['config']} -> {s['dir']}")
  for split, n in s["splits"].items():
    print(f"  {split:<12} {n:>7} examples written, {s['skipped'].get(split, 0)} files skipped "
          f"(corrupt/unreadable), {s['label_resized'].get(split, 0)} labels resized to their "
          "image's size")
  print(f"  {_human(s['bytes'])} on disk, {s['seconds']:.1f} s")
  for f in s["skipped_files"][:20]:
    print(f"  skipped: {f}")
  if len(s["skipped_files"]) > 20:
    print(f"  ... and {len(s['skipped_files']) - 20} more skipped files")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=sorted(DATASETS))
  parser.add_argument("--manual_dir",
                      help="folder with the extracted dataset (or the Cityscapes zips)")
  parser.add_argument("--config", default=None,
                      help="builder config (gta5: 1280x720|full, synthia: 1280x760|full, "
                           "cityscapes: 1024x512|full, demo: source|target); 'all' builds every "
                           "config")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--skip_corrupt", action="store_true",
                      help="skip unreadable files (reported) instead of failing")
  parser.add_argument("--num_workers", type=int, default=None,
                      help="decode/resize threads (default: #cores, max 8)")
  args = parser.parse_args(argv)

  from udajax import cli  # pylint: disable=g-import-not-at-top
  from udajax import datasets  # pylint: disable=g-import-not-at-top
  name = DATASETS[args.dataset]
  config = args.config or DEFAULT_CONFIGS[name]
  configs = datasets.config_names(name) if config == "all" else (config,)
  summaries = []
  for c in configs:
    try:
      summaries.append(build(name, c, manual_dir=args.manual_dir, data_dir=args.data_dir,
                             skip_corrupt=args.skip_corrupt, num_workers=args.num_workers))
    # CorruptFileError (a bad file, named), ValueError (bad arguments), FileNotFoundError (no
    # images under --manual_dir), AssertionError (TFDS's own manual-dir check): one line each.
    except (datasets.CorruptFileError, ValueError, FileNotFoundError, AssertionError) as e:
      cli.fail(e)
  for s in summaries:
    print_summary(s)
  return summaries


if __name__ == "__main__":
  main()
