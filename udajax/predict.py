r"""Writes a model's predictions as PNG files, one per image.

    python -m udajax.predict --config=configs/gta.py --checkpoint=runs/gta --output=preds \
        [--format=cityscapes|trainid|color|overlay] [--images='frames/*.png'] [--which=best|latest]

Without `--images` it predicts the config's eval set (`config.eval.*`: e.g.
`--config.eval.builder_config=full --config.eval.label_size="(1024, 2048)"` for predictions at
the full label resolution, `--config.eval.flip=True` for flip test-time augmentation), at the
label resolution, with the evaluation's own batching and forward pass. With `--images=GLOB` it
predicts any image files: each is resized to `config.eval.image_size` for the network and its
prediction upsampled back to the image's own size.

Formats (one per call; files are named after the image's original file name, as `.png`, and
written directly in `--output`):
  cityscapes  Cityscapes label ids (7 = road, ..., 33 = bicycle; not train ids), 8-bit: what the
              Cityscapes benchmark server and `cityscapesscripts`' evalPixelLevelSemanticLabeling
              read (they find `<city>_<seq>_<frame>*.png`; the Cityscapes file names keep that).
  trainid     Cityscapes train ids 0..18, 8-bit (255 is never predicted).
  color       the Cityscapes palette, RGB.
  overlay     the palette blended over the image (`OVERLAY_ALPHA` of colour), RGB; for the eval
              set the image is the network's input, resized to the label size if they differ.
16-class (SYNTHIA) models write their 16 classes as the Cityscapes ids of those classes.
"""

import concurrent.futures
import glob
import os
import sys
import time
from typing import Optional

import numpy as np
from PIL import Image

from udajax import cli
from udajax import errors
from udajax.prediction_formats import FORMATS, PredictInputError, output_name, render, write_png


# ----------------------------------------------------------------------------- running a model


class Progress:
  """A one-line progress bar on stderr: images done / total and images per second."""

  def __init__(self, total: int, enabled: bool = True, stream=None, min_interval: float = 0.5):
    self.total, self.done, self.enabled = total, 0, enabled
    self.stream = stream or sys.stderr
    self.start = time.time()
    self.last = 0.0
    self.min_interval = min_interval
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def line(self) -> str:
    rate = self.done / max(time.time() - self.start, 1e-9)
    width = 30
    filled = int(width * self.done / max(self.total, 1))
    return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} images, "
            f"{rate:.2f} images/s")

  def update(self, n: int) -> None:
    self.done += n
    now = time.time()
    if self.enabled and (now - self.last >= (self.min_interval if self.tty else 10.0)
                         or self.done >= self.total):
      self.last = now
      self.stream.write(("\r" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
      self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()


class _Writer:
  """Writes predictions into `output` in format `fmt`; refuses two images of the same name."""

  def __init__(self, output: str, fmt: str, num_classes: int):
    self.output, self.fmt, self.num_classes = output, fmt, num_classes
    self.sources = {}
    try:
      os.makedirs(output, exist_ok=True)
    except OSError as e:
      raise PredictInputError(f"cannot create the output folder {output}: {e}") from e

  def __call__(self, file_name, pred, image=None) -> str:
    name = output_name(file_name)
    if name in self.sources:
      raise PredictInputError(
          f"two images would write the same prediction {name}: {self.sources[name]} and "
          f"{file_name!s}; predict them in separate calls (different --output)")
    self.sources[name] = file_name
    path = os.path.join(self.output, name)
    try:
      write_png(path, render(pred, self.fmt, self.num_classes, image=image))
    except OSError as e:
      raise PredictInputError(f"cannot write {path}: {e}") from e
    return path


def _resize_rgb(image: np.ndarray, size) -> np.ndarray:
  """(H, W, 3) uint8 -> size (h, w) with PIL bilinear (pictures only)."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def predict_eval_set(config, replicated, writer: _Writer, *, progress: bool = True) -> int:
  """Predicts this process's share of `config.eval` at the label size; returns images written.

  Runs the evaluation's own batches and eval step (`evaluation.eval_outputs`), so the files hold
  exactly the predictions that `python -m udajax.evaluate` scores.
  """
  import jax
  from udajax import evaluation
  from udajax import images as images_lib
  from udajax import input_pipeline
  from udajax import train_step as ts
  e = config.eval
  n = input_pipeline.num_examples(e.name, e.builder_config, e.split, config.data_dir)
  local = len(range(jax.process_index(), n, jax.process_count()))
  bar = Progress(local, enabled=progress and jax.process_index() == 0)
  written = 0
  for batch, _, pred in evaluation.eval_outputs(config, ts.make_p_eval_step(config),
                                                replicated["params"],
                                                replicated.get("batch_stats", {})):
    pred = np.asarray(pred)
    pred = pred.reshape((-1,) + pred.shape[2:])
    mask = np.asarray(batch["mask"]).reshape(-1)
    names = np.asarray(batch["file_name"]).reshape(-1)
    rgb = None
    if writer.fmt == "overlay":
      rgb = images_lib.denormalize(np.asarray(batch["image"]).reshape(
          (-1,) + batch["image"].shape[2:]))
    for i in np.flatnonzero(mask):
      image = None if rgb is None else _resize_rgb(rgb[i], pred.shape[1:3])
      writer(names[i], pred[i], image)
      written += 1
    bar.update(int(mask.sum()))
  bar.close()
  return written


def list_images(pattern: str) -> list:
  """The files matching `pattern` (a glob, `**` recursive), sorted; PredictInputError if none."""
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise PredictInputError(f"--images={pattern} matches no files")
  return paths


def _open_image(path: str, read):
  """`read(PIL image)`; PredictInputError naming the file if it cannot be read."""
  try:
    with Image.open(path) as im:
      return read(im)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise PredictInputError(f"cannot read image {path}: {e}") from e


def read_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8 RGB of an image file; PredictInputError naming the file if unreadable."""
  return _open_image(path, lambda im: np.asarray(im.convert("RGB")))


def check_images(paths) -> dict:
  """{path: (H, W)} from the file headers (cheap), before any computation: PredictInputError
  naming an unreadable file, or two files that would write the same prediction name."""
  sizes = {p: _open_image(p, lambda im: (im.size[1], im.size[0])) for p in paths}
  seen = {}
  for p in paths:
    name = output_name(p)
    if name in seen:
      raise PredictInputError(f"{seen[name]} and {p} would both be written as {name}; predict "
                              "them in separate calls (different --output)")
    seen[name] = p
  return sizes


def predict_files(config, replicated, sizes, writer: _Writer, *, progress: bool = True) -> int:
  """Predicts image files (this process's share of `sizes`), each at its own size.

  `sizes`: {path: (H, W)} as returned by `check_images`.

  Each image is resized (PIL bicubic, as the resized builder configs) to `config.eval.image_size`
  for the network; the logits are upsampled (align corners) to the image's size before the
  argmax (`evaluation.make_p_predict_step`). Images of one size are batched together over the
  local devices (`config.eval.batch_size_per_device` each). Returns images written.
  """
  import jax
  from udajax import evaluation
  from udajax import images as images_lib
  paths = list(sizes)[jax.process_index()::jax.process_count()]
  groups = {}
  for p in paths:
    groups.setdefault(sizes[p], []).append(p)
  h, w = tuple(config.eval.image_size)
  num_devices = jax.local_device_count()
  local_batch = num_devices * config.eval.batch_size_per_device
  chunks = [(size, group[i:i + local_batch]) for size, group in groups.items()
            for i in range(0, len(group), local_batch)]

  def load(path):
    """(the image as read, the network's input (h, w, 3) uint8)."""
    original = read_image(path)
    if original.shape[:2] == (h, w):
      return original, original
    return original, np.asarray(Image.fromarray(original).resize((w, h), Image.BICUBIC))

  p_predict = evaluation.make_p_predict_step(config)
  bar = Progress(len(paths), enabled=progress and jax.process_index() == 0)
  written = 0
  # Decoding and resizing (PIL releases the GIL) of the next batch overlap the current one.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    pending = [pool.submit(load, p) for p in chunks[0][1]] if chunks else []
    for k, (size, chunk) in enumerate(chunks):
      loaded = [f.result() for f in pending]
      if k + 1 < len(chunks):
        pending = [pool.submit(load, p) for p in chunks[k + 1][1]]
      inputs = [x for _, x in loaded]
      inputs += [inputs[-1]] * (local_batch - len(inputs))  # padding, not written
      x = images_lib.normalize(np.stack(inputs)).reshape((num_devices, -1, h, w, 3))
      pred = np.asarray(p_predict(replicated["params"], replicated.get("batch_stats", {}), x,
                                  tuple(size)))
      pred = pred.reshape((-1,) + pred.shape[2:])
      for i, (path, (original, _)) in enumerate(zip(chunk, loaded)):
        writer(path, pred[i], original if writer.fmt == "overlay" else None)
        written += 1
      bar.update(len(chunk))
  bar.close()
  return written


def predict_checkpoint(config, checkpoint: str, output: str, fmt: str = "color", *,
                       images: Optional[str] = None, which: str = "best",
                       progress: bool = True) -> dict:
  """Writes the predictions of `checkpoint` (see the module docstring) into `output`.

  Args:
    config: the run's config (model, `num_classes`, `eval.*`).
    checkpoint: a udajax work directory or a converted checkpoint directory.
    output: folder for the PNG files (created).
    fmt: one of FORMATS.
    images: a glob of image files; None predicts the eval set of `config.eval`.
    which: "best" or "latest" checkpoint of a work directory.
    progress: show the progress bar on stderr.
  Returns:
    {"num_images": files written by this process, "step": the checkpoint's step or None,
     "output": the folder}.
  """
  if fmt not in FORMATS:
    raise PredictInputError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
  # Bad image files, config values, a missing checkpoint and a missing dataset fail within a
  # second, before jax and TensorFlow are even imported.
  sizes = check_images(list_images(images)) if images else None
  from udajax import configuration
  configuration.validate_config(config)
  errors.require_checkpoint_dir(checkpoint)
  errors.reject_remote_path(output, "--output")
  if sizes is None:
    from udajax import dataset_paths
    dataset_paths.require_built(config)  # the eval set; before TensorFlow is imported
  from udajax import data
  from udajax import evaluation
  from udajax import train_step as ts
  if sizes is None:
    data.prepare_datasets(config, training=False)
  variables, step = evaluation.load_checkpoint_variables(config, checkpoint, which)
  replicated = ts.replicate(variables)
  writer = _Writer(os.path.abspath(os.path.expanduser(output)), fmt, config.num_classes)
  if sizes is None:
    n = predict_eval_set(config, replicated, writer, progress=progress)
  else:
    n = predict_files(config, replicated, sizes, writer, progress=progress)
  return {"num_images": n, "step": step, "output": writer.output}


# ----------------------------------------------------------------------------- command line


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A udajax workdir or a directory written by "
                      "data_prep/convert_torch_checkpoint.py.")
  flags.DEFINE_string("output", None, "Folder for the prediction PNGs (created).")
  flags.DEFINE_enum("format", "color", list(FORMATS),
                    "cityscapes: label ids for the official evaluator / benchmark server; "
                    "trainid: train ids 0..18; color: Cityscapes palette; overlay: palette over "
                    "the image.")
  flags.DEFINE_string("images", None, "Glob of image files to predict (quote it; ** recurses). "
                      "Default: the config's eval set.")
  flags.DEFINE_enum("which", "best", ["best", "latest"],
                    "From a workdir: its best checkpoint by eval score or its latest.")
  flags.mark_flags_as_required(["config", "checkpoint", "output"])


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  try:
    result = predict_checkpoint(f.config, f.checkpoint, f.output, f.format, images=f.images,
                                which=f.which, progress=True)
  except errors.USER_ERRORS as e:
    cli.fail(str(e))
  step = "" if result["step"] is None else f" (step {result['step']})"
  print(f"{result['num_images']} predictions ({f.format}) of {f.checkpoint}{step} written to "
        f"{result['output']}", flush=True)


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
