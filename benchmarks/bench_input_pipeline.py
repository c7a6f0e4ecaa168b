"""Input-pipeline throughput at 1280x720 from the pre-resized GTA5 config.

Writes a fake GTA5 tree (default 100 frames at 1914x1052, the real layout: RGB frames, 8-bit
palette labels) in a temporary folder, builds the `gta5/1280x720` config from it, then times
`train_iterator` (augmentation on: flip + blur; normalisation; device reshape) in images/s.

  python benchmarks/bench_input_pipeline.py [--frames=100] [--images=300] [--batch=1] [--devices=1]
                                            [--workdir=/tmp/udajax_bench] [--repeats=3]

Reuses --workdir if it already holds the built dataset. Prints one line per repeat and the best.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cpu_seconds():
  """CPU time (user + system) of this process, all threads."""
  t = os.times()
  return t.user + t.system


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--frames", type=int, default=100)
  p.add_argument("--images", type=int, default=300, help="images timed per repeat")
  p.add_argument("--batch", type=int, default=1, help="batch_size_per_device")
  p.add_argument("--devices", type=int, default=1, help="num_local_devices")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--workdir", default="/tmp/udajax_bench")
  p.add_argument("--no_augment", action="store_true")
  args = p.parse_args()

  import fake_data  # pylint: disable=g-import-not-at-top
  from udajax import datasets, input_pipeline  # pylint: disable=g-import-not-at-top
  from udajax.datasets.common import tfds  # pylint: disable=g-import-not-at-top

  manual = os.path.join(args.workdir, "gta5_raw")
  data_dir = os.path.join(args.workdir, "tfds")
  builder = datasets.get_builder("gta5", "1280x720", data_dir)
  if not builder.is_prepared():
    t0 = time.time()
    if not os.path.isdir(os.path.join(manual, "images")):
      fake_data.write_gta5(manual, n=args.frames, size=(1914, 1052), mismatch=(3,), noise=4)
    t1 = time.time()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    print(f"fake tree: {t1 - t0:.1f} s; build gta5/1280x720 ({args.frames} frames): "
          f"{time.time() - t1:.1f} s ({args.frames / (time.time() - t1):.1f} frames/s); "
          f"stats {builder.build_stats.as_dict()}")
  n = input_pipeline.num_examples("gta5", "1280x720", "train", data_dir)
  size_mb = sum(os.path.getsize(os.path.join(builder.data_dir, f))
                for f in os.listdir(builder.data_dir)) / 2**20
  print(f"dataset: {n} examples, {size_mb:.0f} MiB ({size_mb / n:.2f} MiB/example); "
        f"cpus: {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}")

  per_batch = args.batch * args.devices
  it = input_pipeline.train_iterator(
      "gta5", builder_config="1280x720", split="train", data_dir=data_dir, image_size=(720, 1280),
      batch_size_per_device=args.batch,
      num_local_devices=args.devices, num_classes=19, seed=0, augment=not args.no_augment,
      shard_index=0, num_shards=1)
  for _ in range(max(2, 8 // per_batch)):  # warm-up: tf.data start, autotune
    batch = next(it)
  assert batch["image"].shape == (args.devices, args.batch, 720, 1280, 3)
  rates, cpu_per_image = [], []
  for r in range(args.repeats):
    steps = max(1, args.images // per_batch)
    t0, c0 = time.time(), _cpu_seconds()
    for _ in range(steps):
      batch = next(it)
    dt, dc = time.time() - t0, _cpu_seconds() - c0
    rates.append(steps * per_batch / dt)
    cpu_per_image.append(dc / (steps * per_batch))
    print(f"repeat {r}: {steps * per_batch} images in {dt:.2f} s = {rates[-1]:.1f} images/s; "
          f"{1000 * cpu_per_image[-1]:.0f} ms CPU/image (load avg {os.getloadavg()[0]:.2f})")
  cpu = float(np.median(cpu_per_image))
  print(f"best: {max(rates):.1f} images/s, median {np.median(rates):.1f} images/s "
        f"(1280x720, batch {args.devices}x{args.batch}, augment={not args.no_augment}); "
        f"CPU cost {1000 * cpu:.0f} ms/image -> {os.cpu_count() / cpu:.0f} images/s if all "
        f"{os.cpu_count()} cores were free")


if __name__ == "__main__":
  main()
