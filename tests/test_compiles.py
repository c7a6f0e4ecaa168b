"""The compile counter and the placement that makes the train step compile once.

The trainer runs themselves (fresh, resumed, warm-up stage then adaptation) assert one train-step
compilation per run in tests/test_trainer.py; tests/test_multihost.py checks each process's
logged count.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from udajax import compiles
from udajax import train_step as ts


def test_counter_counts_compilations_inside_wrapped_calls_only():
  x = np.arange(4, dtype=np.float32)
  with compiles.CompileCounter() as counter:
    f = counter.wrap(jax.jit(lambda v: jnp.sin(v) * 3.0))
    f(x)
    f(x + 1)  # same shapes: no new compilation
    f(x[:2])  # new shape: one more
    jax.jit(lambda v: jnp.cos(v) - 1.0)(x)  # outside the wrapped calls: not counted
  assert counter.count == 2, counter.names
  assert all("lambda" in name for name in counter.names), counter.names
  f(x[:3])  # after the context: the listener is gone
  assert counter.count == 2


def test_replicated_state_has_the_sharding_the_step_returns():
  """`ts.replicate` places arrays like a pmap over ts.AXIS returns them (the mesh axis name is
  part of the sharding), so the second call of a pmapped step reuses the first compilation;
  `flax.jax_utils.replicate`'s default does not and costs a second one."""
  x = {"a": np.arange(3, dtype=np.float32), "step": np.int32(0)}
  for place, expected in ((ts.replicate, 1), (flax.jax_utils.replicate, 2)):
    with compiles.CompileCounter() as counter:
      step = counter.wrap(jax.pmap(lambda t: {"a": t["a"] * 2.0, "step": t["step"] + 1},
                                   axis_name=ts.AXIS))
      placed = place(x)
      out = step(step(step(placed)))
    assert counter.count == expected, (place, counter.names)
    for a, b in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(out)):
      assert (a.sharding == b.sharding) == (expected == 1), (a.sharding, b.sharding)
    np.testing.assert_array_equal(np.asarray(out["a"]),
                                  np.stack([x["a"] * 8.0] * jax.local_device_count()))
    np.testing.assert_array_equal(np.asarray(out["step"]), [3] * jax.local_device_count())


def test_created_state_step_is_a_strong_int32_through_jit():
  """flax's TrainState starts `step` as the Python int 0: a jitted function sees it weakly typed
  and returns it weakly typed, and the pmapped step (which returns a strong int32) then compiles
  a second time for a state that went through such a function (a reference step in a test, a
  user's own jitted update). `create_train_state` starts from a strong int32."""
  from udajax import configuration
  config = configuration.base_config()
  config.model.stage_blocks, config.model.base_width = (1, 1, 1, 1), 4
  variables = jax.eval_shape(lambda: ts.init_variables(config, jax.random.PRNGKey(0)))
  variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), variables)
  state = ts.create_train_state(config, variables, jax.random.PRNGKey(1))
  assert jax.typeof(state.step) == jax.typeof(jnp.zeros((), jnp.int32))
  grads = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  new = jax.eval_shape(lambda s: s.apply_gradients(grads=grads), state)
  assert (new.step.dtype, new.step.weak_type) == (jnp.int32, False)


def test_replicate_and_unreplicate_compile_nothing():
  """Placing a state of jax arrays on the devices and taking the first device's copy back run
  no XLA program (flax.jax_utils.replicate stacks jax arrays on the device: at least one program
  per distinct leaf shape, checked last); the round trip gives the values, dtypes (bfloat16
  included) and shapes back exactly."""
  rng = np.random.default_rng(0)
  tree = {"w": jnp.asarray(rng.normal(size=(3, 3, 4, 8)).astype(np.float32)),
          "b": jnp.asarray(rng.normal(size=(7,)).astype(jnp.bfloat16)),
          "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(5)}
  devices = jax.local_devices()
  with compiles.CompileCounter() as counter:
    placed = counter.wrap(ts.replicate)(tree, devices)
    back = counter.wrap(ts.unreplicate)(placed)
  assert counter.count == 0, counter.names
  for key, x in tree.items():
    assert placed[key].shape == (len(devices),) + x.shape and placed[key].dtype == x.dtype
    assert placed[key].sharding.spec == jax.sharding.PartitionSpec(ts.AXIS)
    assert isinstance(back[key], np.ndarray) and back[key].dtype == x.dtype
    np.testing.assert_array_equal(back[key], np.asarray(x))
    for shard in placed[key].addressable_shards:  # every device holds the same copy
      np.testing.assert_array_equal(np.asarray(shard.data)[0], np.asarray(x))
  odd = {"u": jnp.ones((5, 3, 7), jnp.float32), "v": jnp.ones((11, 2), jnp.float32)}  # new shapes
  with compiles.CompileCounter() as counter:
    counter.wrap(flax.jax_utils.replicate)(odd, devices)
  assert counter.count >= 2, counter.names
