"""Where the udajax datasets lie on disk, and the command that builds one; no TensorFlow needed.

`require_built(config, domains)` fails with `DatasetNotBuiltError` (naming the build command)
when a dataset the run reads has no folder under the data directory. It only looks at
the file system, so the command-line tools report a missing dataset before they import
TensorFlow (about 4 s). A folder that exists is checked in full (version, file format) by
`udajax.datasets.load_builder`, which gives the same message for a missing version.

The data directory is `config.data_dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`,
as TFDS resolves it (udajax never registers further TFDS data directories). A data directory
given as a URL (`gs://...`, which TensorFlow can read) is left to TFDS.
"""

import os
from typing import Optional

from udajax.errors import DatasetNotBuiltError

BUILD_SCRIPT = "python data_prep/build_datasets.py"

# TFDS dataset name -> data_prep/build_datasets.py sub-command.
CLI_NAMES = {"gta5": "gta5", "synthia": "synthia", "cityscapes": "cityscapes",
             "udajax_demo": "demo"}

# Built on first use by `udajax.data.prepare_datasets` (procedural, no download).
AUTO_BUILT = ("udajax_demo",)


def build_command(name: str, builder_config: Optional[str] = None,
                  data_dir: Optional[str] = None) -> str:
  """The exact shell command that builds `name`/`builder_config` (manual_dir left for the user)."""
  cli = CLI_NAMES.get(name, name)
  parts = [BUILD_SCRIPT, cli]
  if cli != "demo":
    parts.append(f"--manual_dir=/path/to/{name}")
    if builder_config:
      parts.append(f"--config={builder_config}")
  if data_dir:
    parts.append(f"--data_dir={data_dir}")
  return " ".join(parts)


def data_dir_root(data_dir: Optional[str] = None) -> str:
  """The folder TFDS reads datasets from: `data_dir`, else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets."""
  root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
  return os.path.expanduser(root)


def not_built_error(name: str, builder_config: str, data_dir: Optional[str],
                    looked_for: str) -> DatasetNotBuiltError:
  """The one message for a dataset that is not built: where it was looked for, how to build it."""
  return DatasetNotBuiltError(
      f"dataset {name}/{builder_config} is not built under {data_dir_root(data_dir)} (looked for "
      f"{looked_for}). Build it with:\n  " + build_command(name, builder_config, data_dir))


def require_folder(name: str, builder_config: str, data_dir: Optional[str] = None) -> None:
  """Raises DatasetNotBuiltError when `name`/`builder_config` has no folder under the data
  directory (a URL data directory is not checked here)."""
  root = data_dir_root(data_dir)
  if "://" in root:
    return
  folder = os.path.join(root, name, builder_config)
  if not os.path.isdir(folder):
    raise not_built_error(name, builder_config, data_dir, folder)


def run_domains(config, *, training: bool = True) -> list:
  """The config sections whose datasets a run reads: "eval" and, when `training`, "source" and
  (in UDA mode) "target"."""
  domains = ["eval"]
  if training:
    domains += ["source"] + (["target"] if config.train.mode == "uda" else [])
  return domains


def require_built(config, domains=("eval",)) -> None:
  """`require_folder` for the dataset of each of `config`'s `domains` ("eval", "source",
  "target"), except the demo's (built on first use)."""
  for domain in domains:
    d = config[domain]
    if d.name not in AUTO_BUILT:
      require_folder(d.name, d.builder_config, config.data_dir)
