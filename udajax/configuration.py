"""The config schema shared by every `configs/*.py`, and its validation.

`base_config()` lists every key a run may set, with the paper's GTA5 -> Cityscapes ResNet-101
values as defaults; each file in `configs/` starts from it and changes what differs.
The base config is locked, so assigning an unknown key (a typo in a config file) fails at once
with ml_collections' message; `validate_config` rejects impossible values, naming
the key and why, before anything heavy starts.
"""

import ml_collections
from ml_collections import config_dict

from udajax.errors import ConfigError  # noqa: F401  (re-exported)

BACKBONES = ("resnet101", "vgg16")
MODES = ("uda", "source_only")
DTYPES = ("float32", "bfloat16")
ON_NAN = ("stop", "skip")
SOURCE_ASSIGNMENTS = ("predictions", "labels")
METHODS = ("clustering", "minent", "maxsquare", "adversarial")  # = udajax.methods.METHODS
OPTIMIZERS = ("reference_sgd", "sgd")  # = udajax.optim.OPTIMIZERS (kept here: no jax import)


def base_config() -> ml_collections.ConfigDict:
  """Every key of a run. Defaults: GTA5 -> Cityscapes, DeepLab-v2 ResNet-101, paper settings."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_classes = 19
  # TFDS data directory (None: TFDS's default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
  c.data_dir = config_dict.placeholder(str)
  # Converted PyTorch checkpoint (data_prep/convert_torch_checkpoint.py) or a udajax workdir
  # (its latest complete checkpoint, i.e. the final model of that run). "" = random init.
  c.init_checkpoint = ""

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet101"
  c.model.stage_blocks = (3, 4, 23, 3)
  c.model.base_width = 64
  c.model.vgg_width = 64
  c.model.aspp_dilations = (6, 12)  # the reference uses only these two ASPP branches
  c.model.dtype = "float32"
  c.model.sync_bn = False
  c.model.remat = False

  c.source = ml_collections.ConfigDict()
  c.source.name = "gta5"
  c.source.builder_config = "1280x720"
  c.source.split = "train"
  c.source.image_size = (720, 1280)  # (H, W)

  c.target = ml_collections.ConfigDict()
  c.target.name = "cityscapes"
  c.target.builder_config = "1024x512"
  c.target.split = "train"
  c.target.image_size = (512, 1024)

  c.eval = ml_collections.ConfigDict()
  c.eval.name = "cityscapes"
  c.eval.builder_config = "1024x512"
  c.eval.split = "validation"
  c.eval.image_size = (512, 1024)
  # () = labels at the image size (the reference protocol: image and label at 1024x512).
  # Full-resolution labels: builder_config="full", label_size=(1024, 2048) (the image is resized
  # to image_size on the fly and the logits upsampled to the label size).
  c.eval.label_size = ()
  c.eval.flip = False  # flip test-time augmentation
  c.eval.batch_size_per_device = 1
  c.eval.every_steps = 2500
  c.eval.num_images_to_log = 4
  # Feature-space diagnostics at every evaluation (udajax/embeddings.py, docs/EMBEDDINGS.md):
  # images per domain (0 = off) and the projection sample's cap per class and domain.
  c.eval.embedding_images = 16
  c.eval.embedding_points_per_class = 100

  c.train = ml_collections.ConfigDict()
  c.train.mode = "uda"
  # "reference_sgd": the SGD the authors' code ran (and trained the paper's models with): most
  # backbone tensors are listed 3-4 times (VGG-16: 2) in its parameter groups and updated once per
  # entry, torch 1.0 style (udajax/optim.py, docs/DIFFERENCES.md). "sgd": the textbook SGD the
  # paper describes, one update per tensor per step.
  c.train.optimizer = "reference_sgd"
  c.train.lr = 2.5e-4
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.poly_power = 0.9
  c.train.head_lr_mult = 10.0
  c.train.num_steps = 24750  # length of the poly schedule (5 rounds x 2 epochs x 2,475 images)
  c.train.stop_step = 0  # stop early at this step (0 = run to num_steps)
  c.train.batch_size_per_device = 1
  c.train.augment = True
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  c.train.keep_checkpoints = 3
  c.train.on_nan = "stop"
  # > 0: first train source-only for this many steps (in workdir/source_only), then adapt from it.
  c.train.warmup_source_only_steps = 0

  c.loss = ml_collections.ConfigDict()
  c.loss.lambda_cl = 2e-2
  c.loss.lambda_or = 2.0
  c.loss.lambda_sp = 0.5
  c.loss.lambda_em = 0.1
  c.loss.iw_ratio = 0.2
  c.loss.cluster_norm_order = 1
  c.loss.ortho_temperature = 1.0
  c.loss.sparsity_rho = 0.5
  c.loss.sparsity_power = 2.0
  # Source feature -> class assignment: "predictions" (the reference's default, used for the
  # paper's runs: --use_source_gt is not passed) or "labels" (reference --use_source_gt).
  c.loss.source_assignment = "predictions"
  c.loss.centroid_smoothing = -1.0  # < 0: off; else alpha in [0, 1]

  # The UDA objective on top of the source cross-entropy (udajax/methods, docs/METHODS.md):
  # "clustering" (the paper: config.loss.*), "minent", "maxsquare" (config.loss.lambda_em and
  # iw_ratio), "adversarial". Keys of the other methods are ignored.
  c.adaptation = ml_collections.ConfigDict()
  c.adaptation.method = "clustering"
  c.adaptation.lambda_ent = 1e-3  # minent: ADVENT's LAMBDA_ENT_MAIN
  c.adaptation.lambda_adv = 1e-3  # adversarial: AdaptSegNet's lambda_adv of its last level
  c.adaptation.disc_lr = 1e-4  # adversarial: the discriminator's Adam (AdaptSegNet)
  c.adaptation.disc_betas = (0.9, 0.99)
  c.adaptation.disc_width = 64  # channels of its first layer (64-128-256-512-1)
  c.adaptation.disc_strides = (2, 2, 2, 2, 2)  # its five 4x4 convolutions
  # Locked: assigning a key that does not exist (a typo in a config file or an override) fails
  # at once, naming the key and the keys that exist.
  c.lock()
  return c


def make_source_only(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns a UDA config into the reference's source-only pretraining run (in place).

  ImageNet init (converted from the reference's DeepLab ResNet-101 init or torchvision's VGG-16),
  cross-entropy only, the 200,000-step poly schedule stopped at 80,000 steps.
  """
  c.init_checkpoint = ("pretrained/vgg16_imagenet" if c.model.backbone == "vgg16"
                       else "pretrained/deeplab_r101_imagenet")
  c.train.mode = "source_only"
  c.train.num_steps = 200_000
  c.train.stop_step = 80_000
  c.eval.every_steps = 5000
  c.train.checkpoint_every_steps = 5000
  return c



def _size(config, key):
  v = config
  for k in key.split("."):
    v = v[k]
  if len(v) != 2 or not all(isinstance(x, int) and x > 0 for x in v):
    raise ConfigError(f"config key '{key}' must be (height, width) of positive ints, got {v!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key with an impossible value and why."""

  def need(ok, key, why):
    if not ok:
      v = config
      for k in key.split("."):
        v = v[k]
      raise ConfigError(f"config key '{key}' = {v!r}: {why}")

  need(config.num_classes in (19, 16), "num_classes",
       "must be 19 (GTA5/Cityscapes) or 16 (SYNTHIA)")
  need(config.model.backbone in BACKBONES, "model.backbone", f"must be one of {BACKBONES}")
  need(config.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
  need(len(config.model.stage_blocks) == 4 and all(b >= 1 for b in config.model.stage_blocks),
       "model.stage_blocks", "must be 4 positive block counts")
  need(config.model.base_width >= 1 and config.model.vgg_width >= 1, "model.base_width",
       "widths must be positive")
  dilations = config.model.aspp_dilations
  need(set(dilations) <= {6, 12, 18, 24} and len(dilations) >= 1, "model.aspp_dilations",
       "must be a non-empty subset of (6, 12, 18, 24)")
  for key in ("source.image_size", "target.image_size", "eval.image_size"):
    _size(config, key)
  if tuple(config.eval.label_size):
    _size(config, "eval.label_size")
  t = config.train
  need(t.mode in MODES, "train.mode", f"must be one of {MODES}")
  need(t.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {OPTIMIZERS}")
  need(t.lr > 0, "train.lr", "must be positive")
  need(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
  need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
  need(t.num_steps > 0, "train.num_steps", "must be positive")
  need(0 <= t.stop_step <= t.num_steps, "train.stop_step", "must be in [0, train.num_steps]")
  need(t.batch_size_per_device >= 1, "train.batch_size_per_device", "must be >= 1")
  need(config.eval.batch_size_per_device >= 1, "eval.batch_size_per_device", "must be >= 1")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    need(t[key] >= 1, f"train.{key}", "must be >= 1")
  need(config.eval.every_steps >= 1, "eval.every_steps", "must be >= 1")
  need(isinstance(config.eval.embedding_images, int) and config.eval.embedding_images >= 0,
       "eval.embedding_images", "must be an int >= 0 (images per domain; 0 = off)")
  need(isinstance(config.eval.embedding_points_per_class, int)
       and config.eval.embedding_points_per_class >= 1, "eval.embedding_points_per_class",
       "must be an int >= 1")
  need(t.on_nan in ON_NAN, "train.on_nan", f"must be one of {ON_NAN}")
  need(t.warmup_source_only_steps >= 0, "train.warmup_source_only_steps", "must be >= 0")
  loss = config.loss
  for key in ("lambda_cl", "lambda_or", "lambda_sp", "lambda_em"):
    need(loss[key] >= 0, f"loss.{key}", "loss weights must be >= 0 (0 removes the term)")
  need(0 <= loss.iw_ratio <= 1, "loss.iw_ratio", "must be in [0, 1]")
  need(loss.cluster_norm_order in (1, 2), "loss.cluster_norm_order", "must be 1 or 2")
  need(loss.ortho_temperature > 0, "loss.ortho_temperature", "must be positive")
  need(loss.source_assignment in SOURCE_ASSIGNMENTS, "loss.source_assignment",
       f"must be one of {SOURCE_ASSIGNMENTS}")
  need(loss.centroid_smoothing < 0 or loss.centroid_smoothing <= 1, "loss.centroid_smoothing",
       "must be < 0 (off) or in [0, 1]")
  a = config.adaptation
  need(a.method in METHODS, "adaptation.method", f"must be one of {METHODS}")
  for key in ("lambda_ent", "lambda_adv"):
    need(a[key] >= 0, f"adaptation.{key}", "loss weights must be >= 0")
  need(a.disc_lr > 0, "adaptation.disc_lr", "must be positive")
  need(len(a.disc_betas) == 2 and all(0 <= b < 1 for b in a.disc_betas), "adaptation.disc_betas",
       "must be two numbers in [0, 1)")
  need(a.disc_width >= 1, "adaptation.disc_width", "must be >= 1")
  need(len(a.disc_strides) == 5 and all(s in (1, 2) for s in a.disc_strides),
       "adaptation.disc_strides", "must be five strides, each 1 or 2")
