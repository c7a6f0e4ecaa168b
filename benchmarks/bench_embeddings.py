r"""Cost of the feature-space diagnostics (`udajax.embeddings`) against the evaluation alone.

    # demo size: one evaluation with diagnostics off, and the diagnostics' extra time
    python benchmarks/bench_embeddings.py --config=configs/demo.py [--checkpoint=runs/demo]
    # paper size: compile the eval step and the diagnostics step ahead of time (no run)
    python benchmarks/bench_embeddings.py --config=configs/gta.py --memory_only

Default mode: the model (random initialisation, or --checkpoint) is evaluated on the config's
eval set (`evaluation.evaluate`, what the trainer runs at every evaluation with the diagnostics
off), then the trainer's hook `embeddings.log_embeddings` runs (the measurement and both
pictures, `config.eval.embedding_images` images per domain: what the trainer adds when the
diagnostics are on). Each is run once to compile, then --repeats times; medians. The PCA of
the capped sample is also timed at the paper's feature width (2048 channels, the cap of
19 classes x 2 domains x `eval.embedding_points_per_class` points).

--memory_only: XLA's memory analysis of the compiled eval step (eval image size) and of the
diagnostics step at the source and the eval image size, from abstract inputs, one device.
Prints one JSON line.
"""

import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import common  # noqa: E402
from udajax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A workdir or converted checkpoint "
                                  "(default: random initialisation).")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "compile ahead of time, run nothing")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs after the compiling one")


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if isinstance(m, (list, tuple)):
    m = m[0]
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
  out["peak_memory_bytes"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def memory_only(config) -> dict:
  import jax
  import jax.numpy as jnp
  from udajax import embeddings
  from udajax import train_step as ts
  variables = jax.eval_shape(lambda: ts.init_variables(config, jax.random.PRNGKey(0)))
  rep = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype),
                               variables)
  b = config.eval.batch_size_per_device

  def batch(size):
    return {"image": jax.ShapeDtypeStruct((1, b) + tuple(size) + (3,), jnp.float32),
            "label": jax.ShapeDtypeStruct((1, b) + tuple(size), jnp.int32),
            "mask": jax.ShapeDtypeStruct((1, b), jnp.bool_)}

  out = {}
  t0 = time.perf_counter()
  p_eval = ts.make_p_eval_step(config)
  out["eval_step"] = memory(p_eval.lower(rep["params"], rep["batch_stats"],
                                         batch(config.eval.image_size)).compile())
  out["eval_step"]["compile_s"] = round(time.perf_counter() - t0, 1)
  p_emb = embeddings.make_p_embedding_step(config, config.eval.embedding_points_per_class)
  seed = jax.ShapeDtypeStruct((1,), jnp.uint32)
  for name, size in (("embedding_step_source", config.source.image_size),
                     ("embedding_step_target", config.eval.image_size)):
    t0 = time.perf_counter()
    compiled = p_emb.lower(rep["params"], rep["batch_stats"], batch(size), seed,
                           "labels").compile()
    out[name] = dict(memory(compiled), compile_s=round(time.perf_counter() - t0, 1))
  return out


def timed(fn, repeats, cpu=None):
  """(first wall seconds, median wall seconds); `cpu` (a list) gets the median CPU seconds of
  this process (all threads), which a machine shared with other jobs inflates much less."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times, cpu_times = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  if cpu is not None:
    cpu.append(statistics.median(cpu_times))
  return first, statistics.median(times)


def pca_seconds(num_points, dim, repeats=3):
  import numpy as np
  from udajax import embedding_metrics
  x = np.random.default_rng(0).normal(size=(num_points, dim)).astype(np.float32)
  return timed(lambda: embedding_metrics.project_2d(x), repeats)[1]


def run(config) -> dict:
  import flax
  import jax
  from udajax import data
  from udajax import embeddings
  from udajax import evaluation
  from udajax import input_pipeline
  from udajax import train_step as ts
  e = config.eval
  data.prepare_datasets(config, training=False)
  if _CHECKPOINT.value:
    variables, _ = evaluation.load_checkpoint_variables(config, _CHECKPOINT.value, "latest")
  else:
    variables = jax.device_get(ts.init_variables(config, jax.random.PRNGKey(0)))
  rep = flax.jax_utils.replicate(variables)
  p_eval = ts.make_p_eval_step(config)
  n, k = config.eval.embedding_images, config.eval.embedding_points_per_class
  cpu = []
  eval_first, eval_s = timed(lambda: evaluation.evaluate(config, p_eval, rep["params"],
                                                         rep["batch_stats"]), _REPEATS.value, cpu)
  last = {}

  from clu import metric_writers
  writer = metric_writers.MultiWriter([])  # the trainer's hook, pictures rendered, not stored

  def diagnostics():
    last["r"] = embeddings.log_embeddings(config, rep["params"], rep["batch_stats"], writer, 0)
  emb_first, emb_s = timed(diagnostics, _REPEATS.value, cpu)
  num_points = len(last["r"]["projection"]["points"])
  return {
      "eval_images": input_pipeline.num_examples(e.name, e.builder_config, e.split,
                                                 config.data_dir),
      "embedding_images_per_domain": n, "points_per_class": k,
      "eval_s": round(eval_s, 3), "eval_first_s": round(eval_first, 1),
      "embeddings_s": round(emb_s, 3), "embeddings_first_s": round(emb_first, 1),
      "on_over_off": round((eval_s + emb_s) / eval_s, 3),
      "eval_cpu_s": round(cpu[0], 3), "embeddings_cpu_s": round(cpu[1], 3),
      "on_over_off_cpu": round((cpu[0] + cpu[1]) / cpu[0], 3),
      "load_average_1min": os.getloadavg()[0],
      "projection_points": num_points,
      "measure_s": round(last["r"]["seconds"], 3),
      "pca_s": round(last["r"]["projection"]["seconds"], 4),
      "pca_paper_cap_s": round(pca_seconds(2 * 19 * k, 2048), 3),
  }


def main(argv):
  del argv
  import jax
  config = _CONFIG.value
  result = {"config": flags.FLAGS["config"].config_filename, "cpu": common.cpu_name(),
            "devices": jax.device_count(), "backend": jax.default_backend(),
            "date": time.strftime("%Y-%m-%d")}
  if _MEMORY_ONLY.value:
    result.update(memory_only(config))
  else:
    result.update(run(config))
  print(json.dumps(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
