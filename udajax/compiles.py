"""Counts the XLA compilations that happen inside calls of a function (jax.monitoring events);
compiles parameter initialisers cheaply (`jit_init`).

The training loop counts its train step's compilations and logs the count: one per run (per
stage with a warm-up stage) is the expected value; two means the state the step returns is
placed differently from the state it was first given (see `train_step.replicate`).
"""

import functools
import threading

import jax

# Recorded by jax around every backend compilation, a persistent compilation cache hit included.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """A context manager; `wrap(fn)` counts the compilations during `fn`'s calls in `count`.

  Compilations in other threads (or outside the wrapped calls) are not counted. `names` holds
  the compiled modules' names ("jit__fun" for a pmap), in order.
  """

  def __init__(self):
    self.count = 0
    self.names = []
    self._local = threading.local()

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del duration
    if event == BACKEND_COMPILE_EVENT and getattr(self._local, "inside", False):
      self.count += 1
      self.names.append(str(kwargs.get("fun_name", "")))

  def wrap(self, fn):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
      self._local.inside = True
      try:
        return fn(*args, **kwargs)
      finally:
        self._local.inside = False
    return counted


# Parameter initialisation is threefry bit generation plus elementwise float maths, compiled
# once per start. On the CPU, LLVM at -O1 instead of XLA's default -O2 compiles it 2.5x faster
# (tiny model) to 1.2x (ResNet-101) with bit-identical values: benchmarks/init_compile.py
# measures both, tests/test_models.py asserts the equality.
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def jit_init(init_fn, *args):
  """`jax.jit(init_fn)(*args)`, compiled with `INIT_COMPILER_OPTIONS` for the default backend
  (XLA's defaults elsewhere). Under a transformation (`jax.eval_shape`, an outer jit), where
  nothing is compiled here, it is `jax.jit(init_fn)(*args)` itself."""
  fn = jax.jit(init_fn)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args)):
    return fn(*args)
  return fn.lower(*args).compile(INIT_COMPILER_OPTIONS.get(jax.default_backend()))(*args)
