"""The K controller's state: one compile, the same avals after every update (inside
``lax.cond`` too), the params' dtype kept, no host transfer, the seed's key made in ``init``,
bitwise-deterministic runs and checkpoints, and the docstring's example."""

from __future__ import annotations

import doctest
import functools
import io

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from control_helpers import (
  B,
  C,
  D,
  all_finite,
  assert_state_finite,
  assert_trees_equal,
  avals,
  control_state,
  controller,
  init_params,
  linear_apply,
  make_batch,
  make_step,
  mlp_apply,
  mlp_init,
  mse_loss,
)

import kstep
from kstep._src import options


def test_no_recompilation_on_later_updates():
  num_traces = 0

  def counting_apply(params, batch):
    nonlocal num_traces
    num_traces += 1
    return linear_apply(params, batch)

  opt = kstep.k_controlled_sgd(
      0.1, batch_size=B, apply_fn=counting_apply,
      estimate=kstep.Estimate(estimator="hutchinson", every=2),
  )
  step = make_step(opt, functools.partial(mse_loss, apply_fn=counting_apply))
  params = init_params()
  state = opt.init(params)
  params, state, _ = step(params, state, make_batch(0), make_batch(0))
  traces_after_first = num_traces
  assert traces_after_first > 0
  for t in range(1, 5):
    batch = make_batch(t, scale=1.0 + t)
    params, state, _ = step(params, state, batch, batch)
  assert num_traces == traces_after_first
  assert step._cache_size() == 1
  assert int(kstep.stats(state)["k_num_estimates"]) == 3  # updates 0, 2, 4


@pytest.mark.slow
def test_state_types_survive_update_inside_lax_cond():
  params, batch = init_params(), make_batch(0)
  grads = jax.grad(mse_loss)(params, batch)
  opt = controller(0.1, estimate=kstep.Estimate(output_norm="total", estimator="hutchinson",
                                                every=1))
  state = opt.init(params)

  @jax.jit
  def maybe_update(pred, state):
    return jax.lax.cond(
        pred, lambda s: opt.update(grads, s, params, batch=batch)[1], lambda s: s, state
    )

  updated = maybe_update(True, state)
  assert avals(updated) == avals(state)
  assert int(updated[-1].count) == 1
  assert int(kstep.stats(updated)["k_num_estimates"]) == 1
  assert_trees_equal(maybe_update(False, state), state)
  # Outside lax.cond too: an update returns exactly the avals of the initial state.
  _, plain = jax.jit(lambda s: opt.update(grads, s, params, batch=batch))(state)
  assert avals(plain) == avals(state)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_updates_keep_the_params_dtype(dtype):
  # The defaults: the per-output band, the guard on (its vector is float32 whatever the params).
  lo, hi = options.DEFAULT_TARGETS["per_output"]
  params, batch = init_params(dtype=dtype), make_batch(0, dtype=dtype)
  kwargs = dict(batch_size=B, apply_fn=linear_apply, weight_decay=1e-4)
  opts = [kstep.k_controlled_sgd(10.0, **kwargs)]
  if dtype == jnp.bfloat16:  # inject_hyperparams casts float hyperparameters to bf16
    opts.append(
        optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=("apply_fn",))(
            learning_rate=10.0, **kwargs
        )
    )
  for opt in opts:
    step = make_step(opt)
    state0 = state = opt.init(params)
    p = params
    for _ in range(3):
      p, state, updates = step(p, state, batch, batch)
      assert updates["w"].dtype == dtype
      assert p["w"].dtype == dtype
    assert avals(state) == avals(state0)
    assert step._cache_size() == 1
    s = kstep.stats(state)
    assert s["k"].dtype == s["k_trace"].dtype == s["k_learning_rate"].dtype == jnp.float32
    vector = control_state(state).gn_eigenvector
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(vector)) and vector
    assert_state_finite(state, guard=True)
    assert all_finite(p)
    assert lo <= float(s["k"]) <= hi * (1 + 1e-5)
    # The guard measured λ_max and did not bind (the band's step is far below its cap).
    assert int(s["k_num_capped"]) == 0 and 0 < float(s["sharpness_ratio"]) < 0.5


def test_update_does_no_host_transfer():
  # Cross-entropy: two trace estimates per update (Gauss–Newton and the NTK floor).
  opt = kstep.k_controlled_sgd(
      optax.cosine_decay_schedule(1.0, 100), batch_size=B, apply_fn=linear_apply,
      loss="softmax_cross_entropy", estimate=kstep.Estimate(every=2, num_probes=2),
  )

  def loss_fn(params, batch):
    out = linear_apply(params, batch)
    return jnp.mean(optax.softmax_cross_entropy(out, jax.nn.softmax(batch["y"])))

  step = make_step(opt, loss_fn)
  params, batch = jax.device_put((init_params(), make_batch(0)))
  state = jax.device_put(opt.init(params))
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      params, state, _ = step(params, state, batch, batch)
    s = kstep.stats(state)  # no transfer either
  assert int(s["k_num_estimates"]) == 2
  assert int(s["k_num_skipped"]) == 0
  # The guard does not see host callbacks (jax.debug.print, pure_callback) on CPU: look for them.
  assert "callback" not in step.lower(params, state, batch, batch).as_text()


def test_seed_makes_the_key_in_init():
  params = init_params()
  with_seed = lambda seed: kstep.Estimate(output_norm="total", estimator="exact", seed=seed)
  opt = controller(0.1, estimate=with_seed(7))
  state = opt.init(params)
  np.testing.assert_array_equal(np.asarray(control_state(state).key),
                                np.asarray(jax.random.PRNGKey(7)))
  assert_trees_equal(state, opt.init(params))  # init is a pure function of params
  other = controller(0.1, estimate=with_seed(8)).init(params)
  assert not np.array_equal(np.asarray(control_state(other).key),
                            np.asarray(control_state(state).key))


# ------------------------------------------------------------------------------------------------
# Determinism and checkpoints (CPU)


def ce_loss(params, batch):
  logits = mlp_apply(params, batch)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def classification_batches(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_steps, B, D)).astype(np.float32)
  label = (x[..., 0] > 0).astype(np.int32) + (x[..., 1] > 0).astype(np.int32)
  return [{"x": jnp.asarray(x[t]), "label": jnp.asarray(label[t])} for t in range(num_steps)]


def mlp_controller(seed=0):
  return kstep.k_controlled_sgd(
      1.0, batch_size=B, apply_fn=mlp_apply, loss="softmax_cross_entropy", momentum=0.9,
      weight_decay=1e-4, estimate=kstep.Estimate(every=3, seed=seed),
  )


@functools.cache
def mlp_step():
  """One compiled step for the tests below (``seed`` only enters through ``init``)."""
  return make_step(mlp_controller(), ce_loss)


def mlp_steps(params, state, batches):
  history = []
  for batch in batches:
    params, state, _ = mlp_step()(params, state, batch, batch)
    history.append(kstep.stats(state))
  return params, state, history


@pytest.mark.slow
def test_same_seed_gives_bitwise_identical_trajectory():
  batches = classification_batches(10)
  params = mlp_init(0, (D, 16, C))
  # Each run constructs and initialises its own optimizer.
  runs = [mlp_steps(params, mlp_controller(seed).init(params), batches) for seed in (7, 7, 8)]
  (p1, s1, h1), (p2, s2, h2), (p3, s3, h3) = runs
  assert_trees_equal((p1, s1, h1), (p2, s2, h2))
  assert [int(h["k_num_estimates"]) for h in h1] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
  # Another seed draws other probes: other estimates, another trajectory.
  assert float(h1[0]["k_trace_raw"]) != float(h3[0]["k_trace_raw"])
  assert not np.array_equal(np.asarray(p1[0]["w"]), np.asarray(p3[0]["w"]))


@pytest.mark.slow
def test_checkpoint_restore_continues_bitwise_identically():
  batches = classification_batches(10)
  params0 = mlp_init(0, (D, 16, C))
  opt = mlp_controller()
  ref = mlp_steps(params0, opt.init(params0), batches)[:2]
  mid = mlp_steps(params0, opt.init(params0), batches[:5])[:2]  # after update 4: mid-interval
  template = (mlp_init(1, (D, 16, C)), opt.init(params0))
  blob = flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(mid))
  for restored in (
      flax.serialization.from_bytes(template, flax.serialization.to_bytes(mid)),
      flax.serialization.from_state_dict(template, flax.serialization.msgpack_restore(blob)),
  ):
    assert_trees_equal(restored, mid)
    assert int(restored[1][-1].count) == 5
    restored = jax.device_put(restored)  # NumPy arrays back on the device
    assert_trees_equal(mlp_steps(*restored, batches[5:])[:2], ref)
  assert mlp_step()._cache_size() == 1  # the restored state has the avals of the live one


@pytest.mark.slow
def test_k_controlled_sgd_docstring_example_runs():
  out = io.StringIO()
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  examples = doctest.DocTestFinder().find(kstep.k_controlled_sgd, "k_controlled_sgd", globs={})
  for example in examples:
    runner.run(example, out=out.write)
  result = runner.summarize(verbose=False)
  assert result.attempted >= 10 and result.failed == 0, out.getvalue()
