"""From a config to batches: dataset checks, and the train and eval iterators of a run.

`prepare_datasets(config)` builds the demo data on first use and fails early (one clear error)
when a dataset is not built or a training crop would upscale the stored images;
`train_batches(config, start_step)` and `eval_batches(config)` wrap `udajax.input_pipeline` with
the config's datasets, sizes and this process's devices.
"""

from typing import Iterator

import jax

from udajax import dataset_paths
from udajax import input_pipeline
from udajax import multihost
from udajax.errors import ConfigError


def prepare_datasets(config, *, training: bool = True) -> None:
  """Builds the demo dataset on first use (it needs no download) and checks what the run reads.

  `training`: the source (and, in UDA mode, target) datasets and their crop sizes are checked
  too; otherwise (evaluation, prediction) only the eval dataset. The eval dataset is opened in
  full either way, so a training run with a bad eval set stops before its first step. A real
  dataset that is not built raises DatasetNotBuiltError naming the command that builds it. All
  processes must call this.
  """
  from udajax import datasets
  domains = dataset_paths.run_domains(config, training=training)
  dataset_paths.require_built(config, domains)
  auto_built = any(config[d].name in dataset_paths.AUTO_BUILT for d in domains)
  if auto_built and jax.process_index() == 0:
    datasets.ensure_demo_built(config.data_dir)
  multihost.barrier("datasets_ready", timeout_s=3600)  # process 0 may be building the demo data
  # The eval set in full (version, file format) now, not at the first evaluation of a training run.
  datasets.load_builder(config.eval.name, config.eval.builder_config, config.data_dir)
  if training:
    check_train_sizes(config)


def check_train_sizes(config) -> None:
  """Rejects a training crop larger than the stored images (an upscale is a config mistake).

  The pipeline resizes the stored images to `image_size` on the fly; downscaling is fine (and
  evaluation may use any size), but enlarging training images only blurs them and costs time,
  so it is almost always a wrong key or builder config. Also fails early when a training
  dataset is not built (DatasetNotBuiltError naming the build command).
  """
  from udajax import datasets
  domains = ["source"] + (["target"] if config.train.mode == "uda" else [])
  for domain in domains:
    d = config[domain]
    builder = datasets.load_builder(d.name, d.builder_config, config.data_dir)
    stored = tuple(builder.info.features["image"].shape[:2])
    if None in stored:
      continue  # original-size config: sizes vary per example
    h, w = tuple(d.image_size)
    if h > stored[0] or w > stored[1]:
      raise ConfigError(
          f"config key '{domain}.image_size' = {(h, w)} is larger than the stored images of "
          f"{d.name}/{d.builder_config} ({stored[0]}x{stored[1]}, HxW): training images would be "
          f"upscaled. Set {domain}.image_size to at most {stored}, or build and use a larger "
          f"builder config ({domain}.builder_config, e.g. 'full')")


def train_batches(config, start_step: int) -> Iterator[dict]:
  """Infinite per-device train batches from `start_step` on (a pure function of seed and step).

  Yields {"source_image": (D, B, Hs, Ws, 3) float32, "source_label": (D, B, Hs, Ws) int32} and,
  in UDA mode, "target_image": (D, B, Ht, Wt, 3); D = local devices, B = batch per device.
  """
  t = config.train
  common = dict(data_dir=config.data_dir, batch_size_per_device=t.batch_size_per_device,
                num_local_devices=jax.local_device_count(), num_classes=config.num_classes,
                start_step=start_step, augment=t.augment)
  source = input_pipeline.train_iterator(
      config.source.name, builder_config=config.source.builder_config, split=config.source.split,
      image_size=tuple(config.source.image_size), seed=config.seed, **common)
  target = None
  if t.mode == "uda":
    target = input_pipeline.train_iterator(
        config.target.name, builder_config=config.target.builder_config,
        split=config.target.split, image_size=tuple(config.target.image_size),
        seed=config.seed + 1, with_labels=False, **common)
  for s in source:
    batch = {"source_image": s["image"], "source_label": s["label"]}
    if target is not None:
      batch["target_image"] = next(target)["image"]
    yield batch


def eval_batches(config) -> Iterator[dict]:
  """This process's share of the eval set, each example once (padding has mask False).

  Every process yields the same number of batches (multi-host pmap needs it). Yields
  {"image": (D, B, H, W, 3) float32, "label": (D, B, Hl, Wl) int32, "mask": (D, B) bool,
  "file_name": (D, B) bytes}; (Hl, Wl) = `eval.label_size`, or the image size when empty.
  """
  e = config.eval
  return input_pipeline.eval_iterator(
      e.name, builder_config=e.builder_config, split=e.split, data_dir=config.data_dir,
      image_size=tuple(e.image_size), label_size=tuple(e.label_size) or None,
      batch_size_per_device=e.batch_size_per_device,
      num_local_devices=jax.local_device_count(), num_classes=config.num_classes)
