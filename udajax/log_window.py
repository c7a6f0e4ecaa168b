"""The training log window, kept on the devices: the host fetches it only at log / save steps.

Every step's metrics (loss terms, lr, "finite") are added to a small per-device window by the
same pmapped program as the step, so the host can dispatch step after step without waiting for
any of them. The window holds, in the sorted order of the metric names (without "finite"):

    sum            (MAX_TERMS,) float32  the sum over finite steps of each metric
    count          () int32              finite steps
    skipped        () int32              non-finite steps (their update was not applied)
    first_bad_step () int32              the first non-finite step of the window, 0 if none
    first_bad      (MAX_TERMS,) float32  that step's metrics

The averages `sum / count` are computed in float32 like `clu.metrics.Average` with a mask (a
skipped step counts in none).
"""

import dataclasses
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from udajax import train_step as ts

MAX_TERMS = 32


def empty() -> dict:
  """A window with no step in it (host numpy; place it with `train_step.replicate`)."""
  return {"sum": np.zeros((MAX_TERMS,), np.float32), "count": np.zeros((), np.int32),
          "skipped": np.zeros((), np.int32), "first_bad_step": np.zeros((), np.int32),
          "first_bad": np.zeros((MAX_TERMS,), np.float32)}


def metric_names(metrics: dict) -> list:
  """The window's metric names, in slot order."""
  return sorted(k for k in metrics if k != "finite")


def add(window: dict, metrics: Dict[str, jnp.ndarray], step) -> dict:
  """`window` with one step's metrics added (`step`: the number of steps done after it)."""
  names = metric_names(metrics)
  if len(names) > MAX_TERMS:
    raise ValueError(f"the train step returns {len(names)} metrics; the log window holds at "
                     f"most MAX_TERMS={MAX_TERMS} (udajax/log_window.py)")
  values = jnp.zeros((MAX_TERMS,), jnp.float32).at[:len(names)].set(
      jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names]))
  finite = metrics["finite"] > 0
  first = jnp.logical_and(window["first_bad_step"] == 0, jnp.logical_not(finite))
  return {
      "sum": window["sum"] + jnp.where(finite, values, 0.0),
      "count": window["count"] + finite.astype(jnp.int32),
      "skipped": window["skipped"] + jnp.logical_not(finite).astype(jnp.int32),
      "first_bad_step": jnp.where(first, jnp.asarray(step, jnp.int32), window["first_bad_step"]),
      "first_bad": jnp.where(first, values, window["first_bad"]),
  }


def make_p_train_step(config, devices=None):
  """pmapped `(state, batch, window) -> (state, metrics, window)`: one train step, its metrics
  added to the window. The state and the window are donated; place both with
  `train_step.replicate`."""
  step_fn = ts.make_train_step(config)

  def step_and_log(state, batch, window):
    state, metrics = step_fn(state, batch)
    return state, metrics, add(window, metrics, state.step)

  return jax.pmap(step_and_log, axis_name=ts.AXIS, devices=devices, donate_argnums=(0, 2))


@dataclasses.dataclass
class Summary:
  """A fetched window: averages over finite steps, skipped count, the first non-finite step."""
  averages: Dict[str, float]
  skipped: int
  first_bad_step: int  # 0: none
  first_bad: Dict[str, np.float32]


def fetch(window, names) -> Summary:
  """The host summary of a replicated window (waits for the steps added to it)."""
  w = ts.unreplicate(window)
  total, count = w["sum"][:len(names)], np.float32(w["count"])
  with np.errstate(invalid="ignore", divide="ignore"):
    means = total / count  # float32, nan when every step of the window was skipped
  return Summary(averages={k: float(v) for k, v in zip(names, means)},
                 skipped=int(w["skipped"]), first_bad_step=int(w["first_bad_step"]),
                 first_bad=dict(zip(names, w["first_bad"][:len(names)])))
