"""Where the test suite's XLA compile time goes (docs/PERFORMANCE.md, "Test suite").

Two uses:

  # 1. As a pytest plugin: sums the compile events of each test, per pytest process, into
  #    OUT_DIR/compiles_<worker>.json ({test id: [compilations, compile s, trace + lower s]})
  #    and by compiled function into OUT_DIR/functions_<worker>.json; then prints the totals,
  #    the 30 costliest tests and the 20 costliest functions.
  PYTHONPATH=benchmarks SUITE_COMPILES_DIR=/tmp/sc JAX_COMPILATION_CACHE_DIR=/tmp/sc/cache \\
      python -m pytest -p suite_compiles -q -n 2 --dist loadfile tests
  python benchmarks/suite_compiles.py --tests /tmp/sc

  # 2. The compile times jax stored with each entry of a persistent compilation cache (whole
  #    seconds), summed by the compiled function's name.
  python benchmarks/suite_compiles.py --cache /tmp/sc/cache

Only compilations in the pytest processes are seen by the plugin; `python train.py`
subprocesses compile on their own (into the cache, except multi-process runs).
"""

import argparse
import collections
import glob
import json
import os

_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = ("/jax/core/compile/jaxpr_trace_duration",
          "/jax/core/compile/jaxpr_to_mlir_module_duration")
_current = ["<outside tests>"]
_stats = collections.defaultdict(lambda: [0, 0.0, 0.0])
_by_function = collections.defaultdict(lambda: [0, 0.0])  # compiled function's name


def _on_event(event, duration, **kwargs):
  if event == _COMPILE:
    _stats[_current[0]][0] += 1
    _stats[_current[0]][1] += duration
    name = _by_function[kwargs.get("fun_name", "?")]
    name[0] += 1
    name[1] += duration
  elif event in _TRACE:
    _stats[_current[0]][2] += duration


def pytest_configure(config):
  del config
  import jax
  jax.monitoring.register_event_duration_secs_listener(_on_event)


def pytest_runtest_logstart(nodeid, location):
  del location
  _current[0] = nodeid


def pytest_unconfigure(config):
  del config
  out = os.environ.get("SUITE_COMPILES_DIR", ".")
  os.makedirs(out, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  with open(os.path.join(out, f"compiles_{worker}.json"), "w") as f:
    json.dump(dict(_stats), f)
  with open(os.path.join(out, f"functions_{worker}.json"), "w") as f:
    json.dump(dict(_by_function), f)


def summarize_tests(out_dir):
  rows = []
  for path in glob.glob(os.path.join(out_dir, "compiles_*.json")):
    with open(path) as f:
      rows += [(s, n, t, test) for test, (n, s, t) in json.load(f).items()]
  rows.sort(reverse=True)
  print(f"compile {sum(r[0] for r in rows):.0f} s in {sum(r[1] for r in rows)} compilations, "
        f"trace + lower {sum(r[2] for r in rows):.0f} s")
  for s, n, t, test in rows[:30]:
    print(f"{s:7.1f} s {n:5d} compilations {t:6.1f} s trace+lower  {test}")
  by_function = collections.defaultdict(lambda: [0, 0.0])
  for path in glob.glob(os.path.join(out_dir, "functions_*.json")):
    with open(path) as f:
      for name, (n, s) in json.load(f).items():
        by_function[name][0] += n
        by_function[name][1] += s
  print("by compiled function (all processes of the run that the plugin saw):")
  for name, (n, s) in sorted(by_function.items(), key=lambda kv: -kv[1][1])[:20]:
    print(f"{s:7.1f} s {n:5d} compilations  {name}")


def summarize_cache(cache_dir):
  from jax._src import compilation_cache as cc  # the cache's own (de)serialisation
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for path in glob.glob(os.path.join(cache_dir, "*-cache")):
    with open(path, "rb") as f:
      _, seconds = cc.extract_executable_and_time(cc.decompress_executable(f.read()))
    name = os.path.basename(path).split("-")[0]
    by_name[name][0] += 1
    by_name[name][1] += seconds
  total = sum(s for _, s in by_name.values())
  print(f"{sum(n for n, _ in by_name.values())} entries, {total:.0f} s of recorded compile time")
  for name, (n, s) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]:
    print(f"{s:7.0f} s {n:5d}  {name}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--tests", help="SUITE_COMPILES_DIR of a pytest run with this plugin")
  group.add_argument("--cache", help="a JAX_COMPILATION_CACHE_DIR")
  args = parser.parse_args()
  if args.tests:
    summarize_tests(args.tests)
  else:
    summarize_cache(args.cache)
