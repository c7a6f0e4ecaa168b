"""TFDS dataset builders of udajax (imports TensorFlow; the rest of udajax does not need it).

Datasets (TFDS name -> builder configs):
  gta5         full, 1280x720     GTA5 (manual download)
  synthia      full, 1280x760     SYNTHIA-RAND-CITYSCAPES (manual download)
  cityscapes   full, 1024x512     Cityscapes gtFine (manual download; folders or the official zips)
  udajax_demo  source, target     procedural domain-shift demo (generated, no download)

Config names are WIDTHxHEIGHT of the stored examples. All datasets are written in the ArrayRecord
file format so that the input pipeline can read any example by index (see udajax.input_pipeline).
The builders are not added to the global TFDS registry (TFDS ships an unrelated `cityscapes`);
use `get_builder` instead of `tfds.builder`.
"""

import importlib
from typing import Optional

from udajax.dataset_paths import expand_data_dir, not_built_error
from udajax.datasets.common import (  # noqa: F401  (re-exported)
    FILE_FORMAT, BuildStats, CorruptFileError, DatasetNotBuiltError, build_command,
)

_MODULES = {
    "gta5": ("udajax.datasets.gta5", "Gta5"),
    "synthia": ("udajax.datasets.synthia", "Synthia"),
    "cityscapes": ("udajax.datasets.cityscapes", "Cityscapes"),
    "udajax_demo": ("udajax.datasets.demo", "UdajaxDemo"),
}
DATASET_NAMES = tuple(_MODULES)


def builder_class(name: str):
  """The GeneratorBasedBuilder subclass of a udajax dataset name."""
  if name not in _MODULES:
    raise ValueError(f"unknown dataset {name!r}; udajax datasets are {', '.join(DATASET_NAMES)}")
  module, cls = _MODULES[name]
  return getattr(importlib.import_module(module), cls)


def config_names(name: str):
  return tuple(c.name for c in builder_class(name).BUILDER_CONFIGS)


def get_builder(name: str, builder_config: str, data_dir: Optional[str] = None, **kwargs):
  """Instantiates the builder of `name`/`builder_config` (does not build anything).

  `data_dir`: None or "" for TFDS's default; a leading `~` is the home folder."""
  cls = builder_class(name)
  names = config_names(name)
  if builder_config not in names:
    raise ValueError(f"dataset {name!r} has no builder config {builder_config!r}; "
                     f"choose one of {names}")
  return cls(config=builder_config, data_dir=expand_data_dir(data_dir), file_format=FILE_FORMAT,
             **kwargs)


def load_builder(name: str, builder_config: str, data_dir: Optional[str] = None):
  """A built dataset's builder, or DatasetNotBuiltError naming the command that builds it."""
  builder = get_builder(name, builder_config, data_dir)
  if not builder.is_prepared():
    raise not_built_error(name, builder_config, data_dir, builder.data_dir)
  formats = [str(getattr(f, "value", f)) for f in builder.info.available_file_formats()]
  if FILE_FORMAT not in formats:
    raise DatasetNotBuiltError(
        f"dataset {name}/{builder_config} under {builder.data_dir} is stored as {formats}, but the"
        f" input pipeline needs {FILE_FORMAT} (random access). Delete that folder and rebuild"
        " with:\n  " + build_command(name, builder_config, data_dir)
    )
  return builder


def ensure_demo_built(data_dir: Optional[str] = None) -> str:
  """Builds both `udajax_demo` configs (source, target) if missing; returns the data dir used.

  Generation is procedural and deterministic (no download, a few seconds on one CPU core).
  """
  root = None
  for config in config_names("udajax_demo"):
    builder = get_builder("udajax_demo", config, data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare()
    root = builder.data_dir_root
  return str(root)

