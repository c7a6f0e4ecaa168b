"""Where the udajax datasets lie on disk, and the command that builds one; no TensorFlow needed.

`require_built(config, domains)` fails with `DatasetNotBuiltError` (naming the build command)
when a dataset the run reads has no folder under the data directory. It only looks at
the file system, so the command-line tools report a missing dataset before they import
TensorFlow (about 4 s). `udajax.datasets.load_builder` checks a dataset in full (version, file
format) where the run opens it, with the same message for a missing version.

The data directory is `config.data_dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`,
as TFDS resolves it (udajax never registers further TFDS data directories); a leading `~` is
the home folder everywhere (`udajax.datasets.get_builder` expands it too: TFDS itself would
take `~/tfds` literally, as a folder named `~` in the working directory). A data directory given
as a URL (`gs://...`, which TensorFlow can read) is left to TFDS.

Dataset names and builder configs are checked here too (`BUILDER_CONFIGS`, the same as the
builders' own lists: a test compares them), so a typo is a config error naming the key, not a
"not built" message whose build command could not work.
"""

import os
from typing import Optional

from udajax.errors import ConfigError, DatasetNotBuiltError

BUILD_SCRIPT = "python data_prep/build_datasets.py"

# TFDS dataset name -> data_prep/build_datasets.py sub-command.
CLI_NAMES = {"gta5": "gta5", "synthia": "synthia", "cityscapes": "cityscapes",
             "udajax_demo": "demo"}

# Built on first use by `udajax.data.prepare_datasets` (procedural, no download).
AUTO_BUILT = ("udajax_demo",)

# Dataset name -> its builder configs (udajax.datasets.config_names, without importing TFDS).
BUILDER_CONFIGS = {
    "gta5": ("full", "1280x720"),
    "synthia": ("full", "1280x760"),
    "cityscapes": ("full", "1024x512"),
    "udajax_demo": ("source", "target"),
}


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


def expand_data_dir(data_dir: Optional[str]) -> Optional[str]:
  """`data_dir` with a leading `~` expanded (None and "" stay unset, URLs unchanged)."""
  if not data_dir:
    return None
  return data_dir if "://" in data_dir else os.path.expanduser(data_dir)


def data_dir_root(data_dir: Optional[str] = None) -> str:
  """The folder the datasets are read from: `data_dir`, else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets."""
  return (expand_data_dir(data_dir) or expand_data_dir(os.environ.get("TFDS_DATA_DIR"))
          or os.path.expanduser(os.path.join("~", "tensorflow_datasets")))


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


def check_name(config, domain: str) -> None:
  """ConfigError unless `config[domain]` names a udajax dataset and one of its builder configs."""
  d = config[domain]
  if d.name not in BUILDER_CONFIGS:
    raise ConfigError(f"config key '{domain}.name' = {d.name!r}: not a udajax dataset; choose "
                      f"one of {tuple(BUILDER_CONFIGS)}")
  if d.builder_config not in BUILDER_CONFIGS[d.name]:
    raise ConfigError(f"config key '{domain}.builder_config' = {d.builder_config!r}: dataset "
                      f"{d.name} has the builder configs {BUILDER_CONFIGS[d.name]}")


def require_built(config, domains=("eval",)) -> None:
  """For each of `config`'s `domains` ("eval", "source", "target"): its dataset name and builder
  config exist (`check_name`), and, except for the demo (built on first use), its folder
  (`require_folder`)."""
  for domain in domains:
    check_name(config, domain)
  for domain in domains:
    d = config[domain]
    if d.name not in AUTO_BUILT:
      require_folder(d.name, d.builder_config, config.data_dir)
