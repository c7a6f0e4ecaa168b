"""Compile time of the model's parameter initialisation at XLA's default options and at the ones
`udajax.compiles.jit_init` uses, and whether the two give the same values bit for bit.

    python benchmarks/init_compile.py [--models=tiny,demo,resnet101] [--output=FILE]

Per model (tiny: the tests' 4-channel stem with one block per stage; demo: configs/demo.py;
resnet101: the paper's DeepLab-v2), `train_step.init_variables`' function is lowered once and
compiled three times in this process: with the default options, with
`compiles.INIT_COMPILER_OPTIONS` for the backend, and at LLVM -O0 (for comparison, not used);
the persistent compilation cache is off, so all are real compilations. The executables then run
on the same key and their outputs are compared with the default's leaf by leaf
(`np.array_equal`).

Prints one JSON line per model (also appended to --output): model, leaves, compile_s_default,
compile_s_udajax, options, bit_identical, compile_s_o0, bit_identical_o0, backend, cpu.
"""

import functools
import importlib
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import cpu_name, emit_json  # noqa: E402
from udajax import compiles  # noqa: E402
from udajax import configuration  # noqa: E402
from udajax import train_step as ts  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["tiny", "demo", "resnet101"], "models to measure")
_OUTPUT = flags.DEFINE_string("output", None, "append the JSON lines to this file")


def model_config(name: str):
  if name == "resnet101":
    return configuration.base_config()
  c = importlib.import_module("configs.demo").get_config()
  if name == "tiny":
    c.model.base_width = 4
  elif name != "demo":
    raise app.UsageError(f"--models: unknown model {name!r} (tiny, demo, resnet101)")
  return c


def measure(name: str) -> dict:
  config = model_config(name)
  model = ts.create_model(config, axis_name=None)
  args = (jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  lowered = jax.jit(functools.partial(model.init, train=False)).lower(*args)
  options = compiles.INIT_COMPILER_OPTIONS.get(jax.default_backend())
  seconds, outputs = [], []
  for opts in (None, options, {"xla_backend_optimization_level": 0}):
    start = time.perf_counter()
    executable = lowered.compile(opts)
    seconds.append(time.perf_counter() - start)
    outputs.append(jax.tree_util.tree_leaves(jax.device_get(executable(*args))))

  def same(i):
    return all(np.array_equal(a, b) for a, b in zip(outputs[0], outputs[i], strict=True))

  return {"model": name, "leaves": len(outputs[0]), "compile_s_default": round(seconds[0], 2),
          "compile_s_udajax": round(seconds[1], 2), "options": options, "bit_identical": same(1),
          "compile_s_o0": round(seconds[2], 2), "bit_identical_o0": same(2),
          "backend": jax.default_backend(), "cpu": cpu_name()}


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)
  for name in _MODELS.value:
    emit_json(measure(name), _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
