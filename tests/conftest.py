"""Test setup: 4 virtual CPU devices (set before jax is imported), the repo on sys.path, and
derandomised hypothesis.

The session stops with an error, before any test runs, unless jax sees exactly 4 CPU devices:
the multi-device tests compare 4 devices with 1 and would otherwise test something else.
Hypothesis draws the same examples on every run (profile "udajax", the default; set
HYPOTHESIS_PROFILE=random to explore new ones locally).
"""

import os
import sys

import hypothesis
import pytest

NUM_DEVICES = 4

# Multi-device code is tested on CPU with forced host devices; this must happen before jax loads.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Reuse XLA compilations across tests and test runs (the trainer tests compile the same tiny
# steps several times). The cache belongs to the checkout (git ignores it): a fresh clone, as CI
# makes, runs the suite from a cold cache; delete the folder for a cold run here.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

hypothesis.settings.register_profile("udajax", derandomize=True, database=None)
hypothesis.settings.register_profile("random", derandomize=False, database=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "udajax"))


def pytest_sessionstart(session):
  """Fails the run (not a skip) unless jax sees the 4 CPU devices the tests are written for."""
  del session
  import jax  # imported here, after XLA_FLAGS is set above
  backend, count = jax.default_backend(), jax.local_device_count()
  if backend != "cpu" or count != NUM_DEVICES:
    raise pytest.UsageError(
        f"the tests need {NUM_DEVICES} CPU devices, jax has {count} {backend} device(s) "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}). tests/conftest.py sets "
        f"--xla_force_host_platform_device_count={NUM_DEVICES} unless XLA_FLAGS already has a "
        "device count, and only if jax was not imported before it; run with "
        "CUDA_VISIBLE_DEVICES= and without a device count in XLA_FLAGS.")


# Seconds each test file took from a cold compilation cache with `-n 2` (2-core AMD EPYC VM with
# AVX-512, 2026-12-04, xdist's default order: the sum of its tests' setup + call times; the
# multi-process start-up test as it runs now). With `--dist loadfile` the files are handed to the
# xdist workers longest first: xdist's own order (by number of tests) left the slow one-test
# multi-process files to run alone at the end. Unlisted files go first, in collection order.
FILE_SECONDS = {
    "test_methods.py": 222, "test_step_modes.py": 164, "test_train_step.py": 132,
    "test_multihost.py": 110, "test_embeddings.py": 103, "test_resume.py": 91,
    "test_trainer.py": 90, "test_predict.py": 88, "test_evaluation_parity.py": 82,
    "test_bad_inputs.py": 61, "test_profile_script.py": 56, "test_divergence.py": 48,
    "test_conv.py": 41, "test_evaluate.py": 39,
    "test_losses.py": 36, "test_models.py": 35, "test_optim.py": 31, "test_losses_pmap.py": 26,
    "test_input_pipeline.py": 15, "test_convert_checkpoint.py": 6, "test_datasets.py": 3,
    "test_ops.py": 3, "test_metrics.py": 1, "test_compiles.py": 1, "test_configuration.py": 0.5,
    "test_labels.py": 0.5,
    # Its four processes start at collection (pytest_collection_finish below) and run beside the
    # other tests for ~45 s; by the time the file runs, last, the test only reads their results.
    "test_multihost_start.py": 0,
}


def pytest_configure(config):
  """Keeps the order below under xdist (`--no-loadscope-reorder`, set here rather than in
  pytest.ini so that pytest still starts where xdist is not loaded)."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
  """Orders the collected tests by file, longest first (FILE_SECONDS); a stable sort."""
  del session, config
  items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 1e9))


def pytest_collection_finish(session):
  """Starts the late-start processes of tests/test_multihost_start.py as soon as the test is
  collected (not for --collect-only), so that their 40 s delays overlap the other tests."""
  if session.config.option.collectonly:
    return
  if any(item.path.name == "test_multihost_start.py" for item in session.items):
    from tests import test_multihost_start
    test_multihost_start.start_early(session.config._tmp_path_factory)
