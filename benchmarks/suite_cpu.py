"""CPU time of each test of the suite: its own process and the subprocesses it waited for.

The suite is CPU-bound on 2 cores (docs/PERFORMANCE.md, "Test suite"), so CPU seconds, not wall
seconds beside another busy worker, say which tests cost the most. Two uses:

  # 1. As a pytest plugin: writes OUT_DIR/cpu_<worker>.json with one row per test
  #    [test id, own CPU s, waited-for children's CPU s, wall s, start time] and the process
  #    totals (getrusage: user + system, RUSAGE_SELF and RUSAGE_CHILDREN).
  #    Use a new, empty SUITE_CPU_DIR: the report reads every cpu_*.json file there.
  PYTHONPATH=benchmarks SUITE_CPU_DIR=/tmp/cpu JAX_COMPILATION_CACHE_DIR=/tmp/cpu/cache \\
      python -m pytest -p suite_cpu -q -n 2 --dist loadfile tests
  # 2. The report: totals, the costliest tests and the CPU of each test file.
  python benchmarks/suite_cpu.py /tmp/cpu [--top=25]

What a test's row holds (getrusage): its own process's CPU during the test, including its
fixtures' set-up (a module- or session-scoped fixture is charged to the first test that uses
it); its children's CPU as the kernel adds it, when a child is reaped. A child the test waits
for (`subprocess.run`, `Popen.wait`) is charged to that test. A process left running past its
test, such as the late-start processes that tests/conftest.py starts at collection (~1 CPU-s
each), is charged to whichever later test's subprocess call happens to reap it.
"""

import argparse
import collections
import glob
import json
import os
import resource
import time

_rows = []
_start = {}
_active = [True]  # False in the pytest-xdist controller, which only relays the workers' reports


def _cpu():
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime, time.time()


def pytest_sessionstart(session):
  _active[0] = not session.config.pluginmanager.hasplugin("dsession")  # set up by now


def pytest_runtest_logstart(nodeid, location):
  del location
  if _active[0]:
    _start[nodeid] = _cpu()


def pytest_runtest_logfinish(nodeid, location):
  del location
  if not _active[0]:
    return
  (own0, child0, t0), (own1, child1, t1) = _start.pop(nodeid), _cpu()
  _rows.append([nodeid, round(own1 - own0, 3), round(child1 - child0, 3), round(t1 - t0, 3),
                round(t0, 3)])


def pytest_unconfigure(config):
  del config
  if not _active[0]:
    return
  out = os.environ.get("SUITE_CPU_DIR", ".")
  os.makedirs(out, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  own, children, _ = _cpu()
  with open(os.path.join(out, f"cpu_{worker}.json"), "w") as f:
    json.dump({"rows": _rows, "process_cpu_s": round(own, 3),
               "children_cpu_s": round(children, 3)}, f)


def report(directory: str, top: int) -> None:
  rows, own_total, child_total = [], 0.0, 0.0
  paths = sorted(glob.glob(os.path.join(directory, "cpu_*.json")))
  if any(os.path.basename(p).startswith("cpu_gw") for p in paths):  # an -n run: the workers'
    paths = [p for p in paths if os.path.basename(p).startswith("cpu_gw")]
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    rows += data["rows"]
    own_total += data["process_cpu_s"]
    child_total += data["children_cpu_s"]
  if not rows:
    raise SystemExit(f"no cpu_*.json files in {directory}: run the suite with -p suite_cpu first")
  in_tests = sum(r[1] + r[2] for r in rows)
  print(f"CPU {own_total + child_total:.0f} s in the pytest processes and their children "
        f"({own_total:.0f} s own, {child_total:.0f} s children), {in_tests:.0f} s of it inside "
        f"{len(rows)} tests")
  print(f"{'CPU s':>7} {'own':>6} {'child':>6} {'wall s':>7}  test")
  for nodeid, own, child, wall, _ in sorted(rows, key=lambda r: -(r[1] + r[2]))[:top]:
    print(f"{own + child:7.1f} {own:6.1f} {child:6.1f} {wall:7.1f}  {nodeid}")
  by_file = collections.Counter()
  for r in rows:
    by_file[r[0].split("::")[0]] += r[1] + r[2]
  print("by file:")
  for name, seconds in by_file.most_common():
    print(f"{seconds:7.1f}  {name}")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("directory", help="SUITE_CPU_DIR of a run with -p suite_cpu")
  p.add_argument("--top", type=int, default=25)
  a = p.parse_args()
  report(a.directory, a.top)


if __name__ == "__main__":
  main()
