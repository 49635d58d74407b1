"""Tests of the K controller (``kstep.k_controlled_sgd``, ``kstep.scale_by_k_control``) and
``kstep.stats``.

Most tests use a linear model ``f = s · x W`` (``s`` a per-example scale read from the batch): its
Jacobian does not depend on ``W``, so the exact MSE trace is known in closed form,
``T = C · mean_i s_i² ‖x_i‖²``, and the scale lets a test move the trace (or make it NaN, Inf or
0) at will. The last tests train an MLP on scikit-learn's bundled digits.

The tests of the band law use ``LAW``: K on the total trace (``output_norm="total"``, so
``K = η T / (2 α B)``), the curvature guard off and the band (0.4, 0.8) given explicitly, so that
the closed forms below hold exactly. The per-output norm, the NaN stats before the first estimate
and the argument checks have their own tests at the end; the guard's physics is tested in
``test_control_physics.py``.
"""

from __future__ import annotations

import doctest
import functools
import io
import re

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep
from kstep import control, control_defaults
from kstep.control_state import SHARPNESS_STEADY

C = 3  # outputs
D = 5  # inputs
B = 8  # batch size
BAND = (0.4, 0.8)
# The old law, exactly: K on the total trace, no curvature guard, the band given.
LAW = {"output_norm": "total", "max_sharpness_ratio": None, "target": BAND}
# Stats that are NaN until their first valid estimate (the guard's: always, with the guard off).
MEASURED = ("k", "k_scale", "k_trace", "k_trace_raw")
GUARD_STATS = ("gn_lambda_max", "sharpness_ratio", "sharpness_growth")


# ------------------------------------------------------------------------------------------------
# Helpers


def linear_apply(params, batch):
  return batch["scale"] * (batch["x"] @ params["w"])


def mse_loss(params, batch, apply_fn=linear_apply):
  out = apply_fn(params, batch)
  return 0.5 * jnp.mean(jnp.sum(jnp.square(out - batch["y"]), axis=-1))


def make_batch(seed, scale=1.0, n=B, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D)).astype(np.float32)
  y = rng.normal(size=(n, C)).astype(np.float32)
  return {
      "x": jnp.asarray(x, dtype), "y": jnp.asarray(y, dtype),
      "scale": jnp.full((n, 1), scale, dtype),
  }


def exact_trace(batch):
  """Exact per-example MSE (NTK) trace of ``linear_apply``, in float64."""
  x = np.asarray(batch["x"], np.float64)
  s = np.asarray(batch["scale"], np.float64)[:, 0]
  return C * np.mean(s**2 * np.sum(x**2, axis=-1))


def eta_one(trace, momentum, batch_size=B):
  """The step at which K = 1: 2 (1 − μ) B / T."""
  return 2.0 * (1.0 - momentum) * batch_size / trace


def init_params(seed=0, dtype=jnp.float32):
  w = np.random.default_rng(100 + seed).normal(size=(D, C)) / np.sqrt(D)
  return {"w": jnp.asarray(w, dtype)}


def make_step(opt, loss=mse_loss):
  """A jitted training step; gradients on ``grad_batch``, the controller sees ``batch``."""

  @jax.jit
  def step(params, state, batch, grad_batch):
    grads = jax.grad(loss)(params, grad_batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, updates

  return step


def run(opt, params, batches, loss=mse_loss):
  """Runs ``opt`` over ``batches``; returns final params, state and the stats after each step."""
  step = make_step(opt, loss)
  state = opt.init(params)
  history = []
  for batch in batches:
    params, state, _ = step(params, state, batch, batch)
    history.append({k: np.asarray(v) for k, v in jax.device_get(kstep.stats(state)).items()})
  return params, state, history


def controller(learning_rate, **kwargs):
  kwargs.setdefault("batch_size", B)
  kwargs.setdefault("apply_fn", linear_apply)
  kwargs.setdefault("estimator", "exact")
  return kstep.k_controlled_sgd(learning_rate, **{**LAW, **kwargs})


def smoothed(raw, smoothing=0.8, max_change=4.0):
  """The documented smoothing: the first estimate sets T̄, then an EMA of clipped estimates."""
  trace = raw[0]
  for r in raw[1:]:
    trace = smoothing * trace + (1 - smoothing) * np.clip(r, trace / max_change, trace * max_change)
  return trace


def assert_trees_equal(a, b):
  """Bitwise equality of two pytrees (structure, dtypes and values)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def avals(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x), jax.typeof(x).weak_type), tree)


def all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def assert_stats_finite(stats, guard, floor=False):
  """Every stat (one step's or a stacked history's) is finite, except the documented NaNs:
  ``MEASURED`` before the first valid estimate, ``k_trace_stderr`` before the second, the guard's
  stats with the guard off (always) or before its first valid λ estimate (``sharpness_growth``:
  its second), ``k_ntk_scale`` without a trace floor (always) or before the first valid
  estimate; and those are NaN."""
  n = np.asarray(stats["k_num_estimates"])
  lam_seen = np.isfinite(np.asarray(stats["gn_lambda_max"]))  # checked below when guard is off
  assert set(stats) == set(control.ScaleByKControlState.STATS_FIELDS)
  for name, value in stats.items():
    v = np.asarray(value)
    if (name in GUARD_STATS and not guard) or (name == "k_ntk_scale" and not floor):
      assert np.all(np.isnan(v)), name
      continue
    if name in MEASURED or name == "k_ntk_scale":
      defined = n >= 1
    elif name == "k_trace_stderr":
      defined = n >= 2
    elif name == "sharpness_growth":
      defined = np.asarray(stats["sharpness_num_estimates"]) >= 2
    elif name in GUARD_STATS:
      defined = lam_seen
    else:
      defined = np.ones(v.shape, bool)
    assert np.all(np.isfinite(v[defined])), (name, v)
    assert np.all(np.isnan(v[~defined])), (name, v)


def control_state(state):
  """The ``ScaleByKControlState`` inside an optimizer state (exactly one)."""
  found = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, control.ScaleByKControlState))
      if isinstance(x, control.ScaleByKControlState)]
  assert len(found) == 1
  return found[0]


def assert_state_finite(state, guard, floor=False):
  """``assert_stats_finite`` for the controller's stats in ``state``; every other float leaf of
  ``state`` (momentum, the smoothed variance, the guard's vector, ...) finite."""
  inner = control_state(state)
  assert_stats_finite(kstep.stats(state), guard, floor)
  rest = [x for x in jax.tree.leaves(state, is_leaf=lambda x: x is inner) if x is not inner]
  assert all_finite(rest)
  assert all_finite(inner._replace(**{name: 0.0 for name in inner.STATS_FIELDS}))


# ------------------------------------------------------------------------------------------------
# Construction-time validation and the missing batch


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"target": (0.8, 0.4)}, "target"),
        ({"target": (0.0, 0.8)}, "target"),
        ({"target": (-0.1, 0.5)}, "target"),
        ({"target": (0.5, 0.5)}, "target"),
        ({"target": (0.4,)}, "target"),
        ({"target": 0.5}, "target"),
        ({"target": (0.4, "high")}, "target"),
        ({"every": 0}, "every"),
        ({"every": 2.5}, "every"),
        ({"num_probes": 0}, "num_probes"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -4}, "batch_size"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"loss": "hinge"}, "loss"),
        ({"loss": 3}, "loss"),
        ({"estimator": "lanczos"}, "estimator"),
        ({"apply_fn": None}, "apply_fn"),
        ({"apply_fn": "model"}, "apply_fn"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"max_change": 1.0}, "max_change"),
        ({"max_scale": 0.0}, "max_scale"),
        ({"trace_floor": -0.1}, "trace_floor"),
        ({"trace_floor": "sometimes"}, "trace_floor"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"output_norm": "mean"}, "output_norm"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"seed": True}, "seed"),
        ({"probe_batch_size": 0}, "probe_batch_size"),
        ({"sharpness_iters": 0}, "sharpness_iters"),
        ({"max_sharpness_ratio": 0.0}, "max_sharpness_ratio"),
        ({"nesterov": 1}, "nesterov"),
        ({"decay_steps": 0}, "decay_steps"),
        ({"band_decay": 0.5}, "band_decay"),
    ],
)
def test_construction_errors_name_the_argument(kwargs, name):
  args = {"batch_size": B, "apply_fn": linear_apply, **kwargs}
  with pytest.raises(ValueError, match=f"`{name}`"):
    kstep.k_controlled_sgd(0.1, **args)
  if name != "weight_decay":  # k_controlled_sgd only
    with pytest.raises(ValueError, match=f"`{name}`"):
      kstep.scale_by_k_control(0.1, **args)


def test_missing_batch_says_how_to_pass_it():
  params, batch = init_params(), make_batch(0)
  grads = jax.grad(mse_loss)(params, batch)
  for opt in (
      controller(0.1),
      kstep.scale_by_k_control(0.1, batch_size=B, apply_fn=linear_apply),
      optax.chain(optax.clip_by_global_norm(1.0), controller(0.1)),
  ):
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"batch=batch"):
      opt.update(grads, state, params)
    with pytest.raises(ValueError, match=r"batch=batch"):
      jax.jit(lambda g, s, p: opt.update(g, s, p))(grads, state, params)
    with pytest.raises(ValueError, match=r"needs `params`"):
      opt.update(grads, state, None, batch=batch)


# ------------------------------------------------------------------------------------------------
# The optax optimizer contract


def test_accepts_unexpected_extra_kwargs():
  params, batch = init_params(), make_batch(0)
  grads = jax.grad(mse_loss)(params, batch)
  opt = controller(0.1)
  state = opt.init(params)
  ref_updates, ref_state = jax.jit(lambda g, s, p, b: opt.update(g, s, p, batch=b))(
      grads, state, params, batch
  )
  updates, new_state = jax.jit(
      lambda g, s, p, b, r: opt.update(g, s, p, batch=b, epoch=3, rng=r, note="x")
  )(grads, state, params, batch, jax.random.PRNGKey(1))
  assert_trees_equal(updates, ref_updates)
  assert_trees_equal(new_state, ref_state)
  assert int(kstep.stats(new_state)["k_num_estimates"]) == 1


def test_no_recompilation_on_later_updates():
  num_traces = 0

  def counting_apply(params, batch):
    nonlocal num_traces
    num_traces += 1
    return linear_apply(params, batch)

  opt = kstep.k_controlled_sgd(
      0.1, batch_size=B, apply_fn=counting_apply, estimator="hutchinson", every=2
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
  opt = controller(0.1, estimator="hutchinson", every=1)
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


def test_chain_with_clipping_and_weight_decay():
  params, batch = init_params(), make_batch(0, scale=3.0)
  grads = jax.grad(mse_loss)(params, batch)
  wd, mom, clip = 1e-2, 0.9, 0.5
  opt = optax.chain(
      optax.clip_by_global_norm(clip),
      optax.add_decayed_weights(wd),
      optax.trace(decay=mom),
      kstep.scale_by_k_control(
          100.0, batch_size=B, apply_fn=linear_apply, momentum=mom, estimator="exact", **LAW
      ),
  )
  update = lambda opt: jax.jit(lambda s: opt.update(grads, s, params, batch=batch))
  updates, state = update(opt)(opt.init(params))
  s = kstep.stats(state)
  eta = float(s["k_learning_rate"])
  np.testing.assert_allclose(eta, BAND[1] * eta_one(exact_trace(batch), mom), rtol=1e-5)
  gnorm = float(optax.tree.norm(grads))
  assert gnorm > clip  # the clip is active
  expected = -eta * (np.asarray(grads["w"]) * clip / gnorm + wd * np.asarray(params["w"]))
  np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-5, atol=1e-7)
  # The assembled optimizer inside a chain too.
  opt2 = optax.chain(optax.clip_by_global_norm(clip), controller(100.0, weight_decay=wd))
  updates2, _ = update(opt2)(opt2.init(params))
  np.testing.assert_allclose(np.asarray(updates2["w"]), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "static_args, momentum, weight_decay",
    [
        (
            ("apply_fn", "loss", "batch_size", "every", "num_probes", "estimator", "seed",
             "target", "sharpness_iters", "probe_batch_size"),
            0.9, 0.0,
        ),
        (("apply_fn", "num_probes", "sharpness_iters", "probe_batch_size"), 0.0, 1e-3),
    ],
)
def test_inject_hyperparams(static_args, momentum, weight_decay):
  # A Python 0.0 is injected as an array: the chain must hold the same parts in `init` (concrete
  # arrays) and in a jitted `update` (tracers).
  kwargs = dict(
      batch_size=B, apply_fn=linear_apply, every=2, num_probes=2, estimator="exact", seed=3,
      momentum=momentum, weight_decay=weight_decay, **LAW,
  )
  opt = optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=static_args)(
      learning_rate=100.0, **kwargs
  )
  ref = kstep.k_controlled_sgd(100.0, **kwargs)
  step, ref_step = make_step(opt), make_step(ref)
  params = ref_params = init_params()
  state, ref_state = opt.init(params), ref.init(params)
  for t in range(4):
    batch = make_batch(t)
    params, state, _ = step(params, state, batch, batch)
    ref_params, ref_state, _ = ref_step(ref_params, ref_state, batch, batch)
    s = kstep.stats(state)
    np.testing.assert_allclose(
        float(s["k_learning_rate"]), float(kstep.stats(ref_state)["k_learning_rate"]), rtol=1e-6
    )
  np.testing.assert_allclose(
      np.asarray(params["w"]), np.asarray(ref_params["w"]), rtol=1e-5, atol=1e-7
  )
  assert step._cache_size() == 1
  assert int(s["k_num_estimates"]) == 2
  np.testing.assert_allclose(float(s["k"]), BAND[1], rtol=1e-5)
  # The injected base LR can be changed in the state; an in-band value passes unchanged.
  inside = 0.6 * eta_one(float(s["k_trace"]), momentum)
  state.hyperparams["learning_rate"] = jnp.asarray(inside, jnp.float32)
  params, state, _ = step(params, state, make_batch(4), make_batch(4))
  s = kstep.stats(state)
  assert float(s["k_learning_rate"]) == float(s["k_base_learning_rate"]) == np.float32(inside)


def test_inject_hyperparams_traced_trace_floor_and_max_scale():
  # Defaults otherwise (the cross-entropy's total norm, the guard on, its ratio injected too:
  # a number is injected, "auto" (the default) stays static, as trace_floor's).
  opt = optax.inject_hyperparams(
      kstep.k_controlled_sgd,
      static_args=("apply_fn", "num_probes", "sharpness_iters", "probe_batch_size"),
  )(
      learning_rate=1e-4, batch_size=B, apply_fn=linear_apply, loss="softmax_cross_entropy",
      trace_floor=0.05, max_scale=2.0, estimator="exact", max_sharpness_ratio=0.25,
  )
  assert {"trace_floor", "max_scale", "max_sharpness_ratio"} <= set(opt.init(init_params())
                                                                     .hyperparams)
  params = init_params()
  _, state, _ = make_step(opt)(params, opt.init(params), make_batch(0), make_batch(0))
  s = kstep.stats(state)
  np.testing.assert_allclose(float(s["k_learning_rate"]), 2e-4, rtol=1e-6)  # max_scale caps it
  # The floor acts on the kernel scale S (the total trace for the cross-entropy) that sets K and
  # the step; k_trace reports the Gauss–Newton trace itself.
  ntk = exact_trace(make_batch(0))
  assert float(s["k_scale"]) >= 0.05 * ntk * (1 - 1e-5)
  np.testing.assert_allclose(float(s["k_scale"]), max(float(s["k_trace"]), 0.05 * ntk), rtol=1e-5)
  # num_probes sets a shape: a traced one fails with a message that says what to do.
  bad = optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=("apply_fn",))(
      learning_rate=0.1, batch_size=B, apply_fn=linear_apply,
  )
  with pytest.raises(ValueError, match="static_args"):
    make_step(bad)(params, bad.init(params), make_batch(0), make_batch(0))


def test_multi_steps():
  k_steps = 2
  opt = optax.MultiSteps(
      kstep.scale_by_k_control(
          100.0, batch_size=B, apply_fn=linear_apply, estimator="exact", every=1, **LAW
      ),
      every_k_schedule=k_steps,
  )
  step = make_step(opt)
  params = init_params()
  state = opt.init(params)
  grads, emitted_traces = [], []
  for t in range(4):
    batch = make_batch(t)
    grads.append(np.asarray(jax.grad(mse_loss)(params, batch)["w"]))
    new_params, state, updates = step(params, state, batch, batch)
    s = kstep.stats(state)
    if t % k_steps == 0:  # accumulating: no update, inner state untouched
      assert_trees_equal(new_params, params)
      assert int(state.inner_opt_state.count) == t // k_steps
    else:  # emit: −η · mean of the accumulated gradients; the trace seen on the last micro-batch
      emitted_traces.append(exact_trace(batch))
      trace = smoothed(emitted_traces)
      np.testing.assert_allclose(float(s["k_trace"]), trace, rtol=1e-5)
      eta = float(s["k_learning_rate"])
      np.testing.assert_allclose(eta, BAND[1] * eta_one(trace, 0.0), rtol=1e-5)
      mean_g = (grads[-2] + grads[-1]) / 2
      np.testing.assert_allclose(np.asarray(updates["w"]), -eta * mean_g, rtol=1e-5, atol=1e-7)
      assert int(state.inner_opt_state.count) == (t + 1) // k_steps
    params = new_params
  assert int(s["k_num_estimates"]) == 2
  assert step._cache_size() == 1


def scan_train(opt, loss=mse_loss):
  """``train(params, stacked_batches)``: ``lax.scan`` over steps in one jit; returns final params,
  state and the stats after every step (stacked)."""

  @jax.jit
  def train(params, batches):
    def body(carry, batch):
      params, state = carry
      grads = jax.grad(loss)(params, batch)
      updates, state = opt.update(grads, state, params, batch=batch)
      return (optax.apply_updates(params, updates), state), kstep.stats(state)

    (params, state), history = jax.lax.scan(body, (params, opt.init(params)), batches)
    return params, state, history

  return train


def stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@pytest.mark.slow
def test_lax_scan_over_steps_matches_python_loop():
  opt = kstep.k_controlled_sgd(
      10.0, batch_size=B, apply_fn=linear_apply, every=3, momentum=0.9, seed=1
  )
  batches = [make_batch(t, scale=1.0 + 0.1 * t) for t in range(9)]
  params = init_params()
  p_scan, s_scan, h_scan = scan_train(opt)(params, stack(batches))
  p_loop, s_loop, h_loop = run(opt, params, batches)
  np.testing.assert_allclose(np.asarray(p_scan["w"]), np.asarray(p_loop["w"]), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(h_scan["k"]), [h["k"] for h in h_loop], rtol=1e-5
  )
  np.testing.assert_array_equal(np.asarray(h_scan["k_num_estimates"]), [1, 1, 1, 2, 2, 2, 3, 3, 3])
  assert avals(s_scan) == avals(s_loop)


@pytest.mark.slow
def test_vmap_over_seeds_and_param_inits():
  n = 4
  batches = stack([make_batch(t) for t in range(6)])

  def train(seed, params):
    opt = kstep.k_controlled_sgd(
        10.0, batch_size=B, apply_fn=linear_apply, every=2, seed=seed, **LAW
    )
    return scan_train(opt)(params, batches)

  seeds = jnp.arange(n, dtype=jnp.int32)
  params = stack([init_params(i) for i in range(n)])
  p_vm, _, h_vm = jax.jit(jax.vmap(train))(seeds, params)
  assert p_vm["w"].shape == (n, D, C)
  for i in range(n):
    p_i, _, h_i = jax.jit(train)(seeds[i], init_params(i))
    # Equal to float32 rounding: 1e-5 of each element, or of the weights' scale for an element
    # that cancels to near zero (the per-seed run rounds differently from the vmapped one).
    w_i = np.asarray(p_i["w"])
    np.testing.assert_allclose(np.asarray(p_vm["w"][i]), w_i, rtol=1e-5,
                               atol=1e-5 * np.abs(w_i).max())
    np.testing.assert_allclose(
        np.asarray(h_vm["k_trace"][i]), np.asarray(h_i["k_trace"]), rtol=1e-5
    )
  # The probes depend on the seed: four seeds, four different first estimates.
  assert len(np.unique(np.asarray(h_vm["k_trace_raw"][:, 0]))) == n
  np.testing.assert_array_equal(np.asarray(h_vm["k_num_estimates"][:, -1]), [3] * n)
  np.testing.assert_allclose(np.asarray(h_vm["k"]), BAND[1], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_updates_keep_the_params_dtype(dtype):
  # The defaults: the per-output band, the guard on (its vector is float32 whatever the params).
  lo, hi = control_defaults.DEFAULT_TARGETS["per_output"]
  params, batch = init_params(dtype=dtype), make_batch(0, dtype=dtype)
  kwargs = dict(batch_size=B, apply_fn=linear_apply, weight_decay=1e-4)
  opts = [kstep.k_controlled_sgd(10.0, **kwargs)]
  if dtype == jnp.bfloat16:  # inject_hyperparams casts float hyperparameters to bf16
    static = ("apply_fn", "num_probes", "sharpness_iters", "probe_batch_size")
    opts.append(
        optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=static)(
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
      loss="softmax_cross_entropy", every=2, num_probes=2,
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


# ------------------------------------------------------------------------------------------------
# Determinism and checkpoints (CPU)


def mlp_init(seed, sizes):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
  return [
      {"w": jax.random.normal(k, (i, o)) * jnp.sqrt(2.0 / i), "b": jnp.zeros((o,))}
      for k, (i, o) in zip(keys, zip(sizes[:-1], sizes[1:]))
  ]


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def mlp_apply(params, batch):
  return mlp(params, batch["x"])


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
      1.0, batch_size=B, apply_fn=mlp_apply, loss="softmax_cross_entropy", momentum=0.9, every=3,
      weight_decay=1e-4, seed=seed,
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


# ------------------------------------------------------------------------------------------------
# Behaviour of the control law, on the linear model with exact traces.
#
# One jitted run serves every test below: the base LR and the band ends are per-step arrays read
# by schedules, the other knobs are traced arguments, and the batch's scale at step t is
# ``scales[t]`` (the exact trace is then ``scales[t]² · T0``). Gradients always come from the
# clean batch (scale 1), so a NaN scale poisons only the trace estimate.

NUM_STEPS = 12
BASE_BATCH = make_batch(0)
T0 = exact_trace(BASE_BATCH)


@functools.partial(jax.jit, static_argnames=("estimator", "loss", "output_norm", "guard"))
def linear_run(
    learning_rates, scales, lo=BAND[0], hi=BAND[1], *, momentum=0.9, smoothing=0.8,
    max_change=4.0, every=1, max_scale=np.inf, seed=0, estimator="exact", loss="mse",
    output_norm="total", guard=False, refresh_every=1,
):
  num_probes = 64  # for "hutchinson"; cheap on this model
  steps = jnp.arange(NUM_STEPS)
  at = lambda values: (lambda count: jnp.broadcast_to(values, (NUM_STEPS,))[count])
  opt = kstep.k_controlled_sgd(
      at(learning_rates), batch_size=B, apply_fn=linear_apply, loss=loss, target=(at(lo), at(hi)),
      momentum=momentum, every=every, num_probes=num_probes, estimator=estimator,
      smoothing=smoothing, max_change=max_change, max_scale=max_scale, seed=seed,
      output_norm=output_norm, max_sharpness_ratio=0.5 if guard else None,
      refresh_every=refresh_every,
  )
  params = init_params()

  def body(carry, t):
    params, state = carry
    batch = dict(BASE_BATCH, scale=jnp.full((B, 1), scales[t], jnp.float32))
    grads = jax.grad(mse_loss)(params, BASE_BATCH)
    updates, state = opt.update(grads, state, params, batch=batch)
    return (optax.apply_updates(params, updates), state), kstep.stats(state)

  (params, state), history = jax.lax.scan(body, (params, opt.init(params)), steps)
  return (params, state), history


def run_linear(learning_rates, scales=1.0, lo=BAND[0], hi=BAND[1], **kwargs):
  """``linear_run`` with scalars broadcast to per-step arrays; returns ((params, state),
  history). ``output_norm="total"`` and the guard off unless given (``guard=True``)."""
  full = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (NUM_STEPS,))
  final, history = linear_run(full(learning_rates), full(scales), full(lo), full(hi), **kwargs)
  return final, jax.tree.map(np.asarray, history)


def test_first_estimate_happens_at_the_first_update():
  _, h = run_linear(1e3, every=10)
  assert h["k_num_estimates"][0] == 1
  np.testing.assert_allclose(h["k_trace"][0], T0, rtol=1e-5)
  np.testing.assert_allclose(h["k"][0], BAND[1], rtol=1e-5)  # corrected before the first step
  np.testing.assert_array_equal(h["k_num_estimates"], [1] * 10 + [2] * 2)


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_k_reported_matches_the_formula(estimator, momentum):
  lrs = np.geomspace(1e-3, 1e3, NUM_STEPS) * eta_one(T0, momentum)  # below, in and above the band
  scales = np.linspace(0.5, 2.0, NUM_STEPS)
  _, h = run_linear(lrs, scales, momentum=momentum, estimator=estimator, every=2)
  lr, trace = h["k_learning_rate"].astype(np.float64), h["k_trace"].astype(np.float64)
  np.testing.assert_allclose(h["k"], lr * trace / (2 * (1 - momentum) * B), rtol=1e-5)
  np.testing.assert_allclose(h["k_base_learning_rate"], lrs.astype(np.float32), rtol=1e-6)
  assert np.all(h["k"] >= BAND[0] * (1 - 1e-5)) and np.all(h["k"] <= BAND[1] * (1 + 1e-5))
  if estimator == "exact":
    expected = smoothed(list(T0 * scales[::2] ** 2))
    np.testing.assert_allclose(h["k_trace"][-1], expected, rtol=1e-5)
  else:  # stochastic (64 probes), but an estimate of the same quantity
    # One estimate has no spread (NaN, updates 0-1); from the second on, a positive stderr.
    assert np.all(np.isnan(h["k_trace_stderr"][:2]))
    assert np.all(np.isfinite(h["k_trace_stderr"][2:])) and np.all(h["k_trace_stderr"][2:] > 0)
    np.testing.assert_allclose(h["k_trace_raw"][::2], T0 * scales[::2] ** 2, rtol=0.2)


def test_base_lr_inside_the_band_passes_unchanged():
  base = np.float32(0.6 * eta_one(T0, 0.9))
  _, h = run_linear(base)
  np.testing.assert_array_equal(h["k_learning_rate"], base)  # bitwise
  np.testing.assert_array_equal(h["k_base_learning_rate"], base)
  np.testing.assert_allclose(h["k"], 0.6, rtol=1e-5)
  assert h["k_num_raised"][-1] == h["k_num_lowered"][-1] == 0


@pytest.mark.parametrize("factor, edge", [(1e4, 1), (10.0, 1), (0.1, 0), (1e-4, 0)])
def test_base_lr_outside_the_band_moves_to_the_nearest_edge(factor, edge):
  base = factor * eta_one(T0, 0.9)
  _, h = run_linear(base)
  np.testing.assert_allclose(h["k_learning_rate"], BAND[edge] * eta_one(T0, 0.9), rtol=1e-5)
  np.testing.assert_allclose(h["k"], BAND[edge], rtol=1e-5)
  counts = (h["k_num_raised"][-1], h["k_num_lowered"][-1])
  assert counts == ((NUM_STEPS, 0) if edge == 0 else (0, NUM_STEPS))


def test_counters_count_each_raised_and_lowered_update():
  # Base K per step: 3 steps below the band, 4 inside, 5 above.
  k_base = np.array([0.1, 0.2, 0.3, 0.45, 0.5, 0.6, 0.7, 0.9, 1.0, 2.0, 5.0, 10.0])
  _, h = run_linear(k_base * eta_one(T0, 0.9))
  np.testing.assert_array_equal(h["k_num_raised"], np.minimum(np.arange(1, 13), 3))
  np.testing.assert_array_equal(h["k_num_lowered"], np.maximum(np.arange(1, 13) - 7, 0))
  np.testing.assert_allclose(h["k"], np.clip(k_base, *BAND), rtol=1e-5)


def test_schedule_base_lr_is_followed_and_clipped():
  schedule = optax.exponential_decay(3.0 * eta_one(T0, 0.9), transition_steps=1, decay_rate=0.7)
  _, h = run_linear(schedule(np.arange(NUM_STEPS)))
  base = np.asarray(schedule(np.arange(NUM_STEPS)), np.float32)
  np.testing.assert_array_equal(h["k_base_learning_rate"], base)
  eta1 = eta_one(T0, 0.9)
  np.testing.assert_allclose(
      h["k_learning_rate"], np.clip(base, 0.4 * eta1, 0.8 * eta1), rtol=1e-5
  )
  k_base = 3.0 * 0.7 ** np.arange(NUM_STEPS)
  in_band = (k_base >= BAND[0]) & (k_base <= BAND[1])
  assert in_band.sum() == 2
  np.testing.assert_array_equal(h["k_learning_rate"][in_band], base[in_band])
  # A schedule for the band's lower end is followed too.
  lo = np.linspace(0.1, 0.7, NUM_STEPS)
  _, h = run_linear(1e-6, lo=lo)
  np.testing.assert_allclose(h["k"], lo, rtol=1e-5)


def test_max_scale_caps_the_step():
  base = 0.01 * eta_one(T0, 0.9)
  _, h = run_linear(base, max_scale=3.0)
  np.testing.assert_allclose(h["k_learning_rate"], 3.0 * base, rtol=1e-6)
  np.testing.assert_allclose(h["k"], 0.03, rtol=1e-5)  # below the band: the cap wins
  assert h["k_num_raised"][-1] == NUM_STEPS
  _, h = run_linear(base, max_scale=100.0)  # a loose cap does not bind
  np.testing.assert_allclose(h["k"], BAND[0], rtol=1e-5)


@pytest.mark.parametrize("smoothing, max_change", [(0.8, 4.0), (0.5, 2.0), (0.0, 10.0)])
def test_one_outlier_moves_the_trace_by_at_most_the_documented_factor(smoothing, max_change):
  d, r = smoothing, max_change
  up, down = 1 + (1 - d) * (r - 1), 1 - (1 - d) * (1 - 1 / r)
  # Outliers of ×1e6 and ×1e-6 in the trace, then an ordinary change of ×1.21.
  scales = np.array([1.0, 1e3, 1.0, 1e-3, 1.1] + [1.0] * 7)
  _, h = run_linear(1e3, scales, smoothing=d, max_change=r)  # base far above the band
  trace = h["k_trace"].astype(np.float64)
  np.testing.assert_allclose(trace[1] / trace[0], up, rtol=1e-5)
  np.testing.assert_allclose(trace[3] / trace[2], down, rtol=1e-5)
  np.testing.assert_allclose(trace[:5], [smoothed(list(T0 * scales[: t + 1] ** 2), d, r)
                                         for t in range(5)], rtol=1e-5)
  # The step follows (K stays at the edge): it moved by the inverse factor, no more.
  lr = h["k_learning_rate"].astype(np.float64)
  np.testing.assert_allclose(lr[1] / lr[0], 1 / up, rtol=1e-5)
  np.testing.assert_allclose(h["k"], BAND[1], rtol=1e-5)
  assert np.isnan(h["k_trace_stderr"][0])  # one estimate: no spread yet
  assert np.all(np.isfinite(h["k_trace_stderr"][1:])) and h["k_trace_stderr"][1] > 0


def test_estimates_only_every_k_steps():
  scales = np.linspace(1.0, 2.0, NUM_STEPS)
  base = np.float32(0.6 * eta_one(T0, 0.9))
  _, h = run_linear(base, scales, every=4)
  np.testing.assert_array_equal(h["k_num_estimates"], np.arange(NUM_STEPS) // 4 + 1)
  trace = h["k_trace"]
  changed = np.flatnonzero(trace[1:] != trace[:-1]) + 1
  np.testing.assert_array_equal(changed, [4, 8])
  np.testing.assert_allclose(trace[8], smoothed(list(T0 * scales[[0, 4, 8]] ** 2)), rtol=1e-5)
  # Between estimates T̄ is held: K follows the step taken.
  np.testing.assert_allclose(h["k"][:4], 0.6, rtol=1e-5)


@pytest.mark.parametrize("guard", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0])
@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_invalid_trace_estimates_are_skipped_and_counted(bad, estimator, guard):
  scales = np.array([1.0, bad, bad, 1.0, bad] + [1.0] * 7)
  (params, state), h = run_linear(1e3, scales, estimator=estimator, guard=guard)
  valid = np.isfinite(scales) & (scales != 0)
  np.testing.assert_array_equal(h["k_num_skipped"], np.cumsum(~valid))
  np.testing.assert_array_equal(h["k_num_estimates"], np.cumsum(valid))
  for t in np.flatnonzero(~valid):  # the previous trace and LR are kept
    assert h["k_trace"][t] == h["k_trace"][t - 1]
    assert h["k_learning_rate"][t] == h["k_learning_rate"][t - 1]
    assert h["k_trace_raw"][t] == h["k_trace_raw"][t - 1]
    if guard:  # the guard's λ_max is kept too: a bad λ never reaches the step
      assert h["gn_lambda_max"][t] == h["gn_lambda_max"][t - 1]
  assert_stats_finite(h, guard)
  assert_state_finite(state, guard)
  assert all_finite(params)
  if guard:  # the same batches are bad for λ_max; the cap (η·λ ≤ 0.5·3.8) is far above the band
    np.testing.assert_array_equal(h["sharpness_num_skipped"], np.cumsum(~valid))
    assert h["k_num_capped"][-1] == 0 and np.all(h["sharpness_ratio"] < 0.5)
  np.testing.assert_allclose(h["k"], BAND[1], rtol=1e-5)


def test_invalid_first_estimate_keeps_the_base_lr():
  def negative_loss(outputs, batch):  # a concave loss: its Gauss–Newton trace is negative
    del batch
    return -0.5 * jnp.sum(jnp.square(outputs), axis=-1)

  for guard in (False, True):  # the guard's λ (a Rayleigh quotient, negative here) is skipped too
    opt = controller(0.05, loss=negative_loss, every=1, max_sharpness_ratio=0.5 if guard else None)
    params, state, h = run(opt, init_params(), [BASE_BATCH] * 3)
    assert [s["k_num_skipped"] for s in h] == [1, 2, 3]
    assert h[-1]["k_num_estimates"] == 0
    # No valid estimate: the measured stats read NaN (not a plausible-looking 0).
    for name in MEASURED + ("k_trace_stderr",):
      assert all(np.isnan(s[name]) for s in h), name
    assert all(s["k_learning_rate"] == np.float32(0.05) for s in h)
    assert h[-1]["k_num_raised"] == h[-1]["k_num_lowered"] == 0
    if guard:
      assert [s["sharpness_num_skipped"] for s in h] == [1, 2, 3]
      assert h[-1]["k_num_capped"] == 0
    assert_state_finite(state, guard)
    assert all_finite(params)


def test_refresh_every_runs_guard_and_floor_at_every_m_th_estimate_far_below_the_cap():
  # every=1, refresh_every=3, the band far below the cap: the power steps and the floor's NTK
  # probe run at estimates 0, 3, 6, 9 only; λ̄ and Ŝ_NTK are held in between although the
  # outputs' scale (so λ and the NTK trace) changes at every step.
  scales = np.linspace(1.0, 2.0, NUM_STEPS)
  _, h = run_linear(1e3, scales, guard=True, refresh_every=3, loss="softmax_cross_entropy",
                    estimator="hutchinson")
  refresh = np.arange(NUM_STEPS) % 3 == 0
  assert np.all(h["sharpness_ratio"] < control.SHARPNESS_NEAR * 0.5)
  np.testing.assert_array_equal(h["sharpness_num_estimates"], np.cumsum(refresh))
  for name in ("gn_lambda_max", "k_ntk_scale"):
    changed = np.flatnonzero(h[name][1:] != h[name][:-1]) + 1
    np.testing.assert_array_equal(changed, np.flatnonzero(refresh)[1:], err_msg=name)
  assert_stats_finite(h, guard=True, floor=True)


def test_refresh_every_runs_the_guard_at_every_estimate_near_the_cap():
  # The band 100x too high: the guard binds (ratio at its cap 0.5), and λ grows by more than
  # SHARPNESS_STEADY per estimate, so its power steps run at every estimate whatever
  # refresh_every says, and λ̄ follows the growing curvature.
  scales = np.linspace(1.0, 3.0, NUM_STEPS)
  _, h = run_linear(1e3, scales, lo=40.0, hi=80.0, guard=True, refresh_every=3)
  np.testing.assert_allclose(h["sharpness_ratio"], 0.5, rtol=1e-5)
  np.testing.assert_array_equal(h["sharpness_num_estimates"], np.arange(1, NUM_STEPS + 1))
  assert np.all(np.diff(h["gn_lambda_max"]) > 0)
  # λ ∝ scale² grew ≥ 13% per estimate: above SHARPNESS_STEADY at every refresh.
  growth = (scales[1:] / scales[:-1]) ** 2
  np.testing.assert_allclose(h["sharpness_growth"][1:], growth, rtol=1e-3)
  assert np.all(growth > SHARPNESS_STEADY)


def test_near_the_cap_a_steady_lambda_skips_the_guard_at_every_other_estimate():
  # At the cap with λ growing 1% per update (below SHARPNESS_STEADY) the power steps run at the
  # even-numbered estimates (and at every refresh_every-th); a jump of λ (×1.5 at update 6)
  # makes the next odd estimate full again, and λ̄ catches up at once.
  scales = np.sqrt(1.01) ** np.arange(NUM_STEPS)
  scales[6:] *= np.sqrt(1.5)
  _, h = run_linear(1e3, scales, lo=40.0, hi=80.0, guard=True, refresh_every=5)
  ran = np.diff(np.concatenate([[0], h["sharpness_num_estimates"]])) == 1
  #             0     1      2     3      4     5     6     7     8     9      10    11
  expected = [True, True, True, False, True, True, True, True, True, False, True, False]
  # update 1: growth unknown until the second λ; 5 and 10: refresh_every; 7: after the jump.
  np.testing.assert_array_equal(ran, expected)
  lam = np.asarray(h["gn_lambda_max"])
  np.testing.assert_allclose(lam[6] / lam[5], 1.5 * 1.01, rtol=1e-3)
  np.testing.assert_allclose(h["sharpness_growth"][6], 1.5 * 1.01, rtol=1e-3)
  # The cap binds throughout, on the λ̄ it has: the skipped estimates keep the last λ̄.
  np.testing.assert_array_equal(lam[[3, 9, 11]], lam[[2, 8, 10]])
  np.testing.assert_allclose(h["sharpness_ratio"], 0.5, rtol=1e-5)


def test_nan_outputs_with_cross_entropy_floor_are_skipped():
  scales = np.array([1.0, np.nan] + [1.0] * 10)
  (params, state), h = run_linear(1e3, scales, loss="softmax_cross_entropy",
                                  estimator="hutchinson")
  np.testing.assert_array_equal(h["k_num_skipped"][:3], [0, 1, 1])
  assert h["k_learning_rate"][1] == h["k_learning_rate"][0]
  assert_state_finite(state, guard=False, floor=True)
  assert all_finite(params)


def test_max_sharpness_ratio_auto_by_loss():
  assert control.resolve_max_sharpness_ratio("auto", "softmax_cross_entropy") == 0.25
  assert control.resolve_max_sharpness_ratio("auto", "sigmoid_binary_cross_entropy") == 0.25
  assert control.resolve_max_sharpness_ratio("auto", "mse") == 0.5
  assert control.resolve_max_sharpness_ratio("auto", lambda out, batch: out.sum(-1)) == 0.5
  assert control.resolve_max_sharpness_ratio(None, "mse") is None
  # The cap the guard applies is the resolved one: η·λ̄ = r·E once the step is capped.
  batch = make_batch(0, scale=30.0)
  for loss, r in (("mse", 0.5), ("softmax_cross_entropy", 0.25)):
    opt = kstep.k_controlled_sgd(1e3, apply_fn=linear_apply, loss=loss, trace_floor=None,
                                 target=(1e3, 2e3), estimator="exact")
    params = init_params()
    grads = jax.grad(mse_loss)(params, batch)
    _, state = jax.jit(lambda s: opt.update(grads, s, params, batch=batch))(opt.init(params))
    np.testing.assert_allclose(float(kstep.stats(state)["sharpness_ratio"]), r, rtol=1e-4)


@pytest.mark.slow
def test_trace_floor_auto():
  assert control.resolve_trace_floor("auto", "softmax_cross_entropy") == 0.03
  assert control.resolve_trace_floor("auto", "sigmoid_binary_cross_entropy") == 0.03
  assert control.resolve_trace_floor("auto", "mse") is None
  assert control.resolve_trace_floor("auto", lambda out, batch: out.sum(-1)) is None
  # A saturated softmax (logits 10 apart): the Gauss–Newton trace is ~1e-3 of the NTK trace.
  batch = {"x": jnp.eye(C, D), "scale": jnp.ones((C, 1))}
  params = {"w": 10.0 * jnp.eye(D, C)}
  # Example i has x_i = e_i and logits 10 e_i: its Jacobian has ‖x_i‖² = 1 per output, so the
  # NTK trace is C and the Gauss–Newton trace is tr(diag(p) − p pᵀ) = 1 − ‖p‖², p = softmax(10 e_i).
  ntk = float(C)
  p = np.exp(10.0 * np.eye(C)[0]) / np.sum(np.exp(10.0 * np.eye(C)[0]))
  gn = 1.0 - np.sum(p**2)
  assert 0 < gn < 1e-3 * ntk
  grads = jax.tree.map(jnp.zeros_like, params)

  def first_estimate(**kwargs):
    """(S, T, Ŝ_NTK) after the first update: the floored kernel scale, the trace itself and the
    floor's NTK scale."""
    opt = kstep.k_controlled_sgd(
        0.1, batch_size=C, apply_fn=linear_apply, estimator="exact", max_sharpness_ratio=None,
        **kwargs,
    )
    _, state = jax.jit(lambda s: opt.update(grads, s, params, batch=batch))(opt.init(params))
    s = kstep.stats(state)
    return float(s["k_scale"]), float(s["k_trace"]), float(s["k_ntk_scale"])

  # The floor acts on S (here the total trace: "auto" for the cross-entropy); k_trace reports T,
  # k_ntk_scale the floor's NTK scale (orthonormal inputs: every Rademacher probe reads C).
  scale, trace, ntk_scale = first_estimate(loss="softmax_cross_entropy")
  np.testing.assert_allclose(scale, 0.03 * ntk, rtol=1e-5)
  np.testing.assert_allclose(trace, gn, rtol=2e-3)
  np.testing.assert_allclose(ntk_scale, ntk, rtol=1e-5)
  scale, trace, ntk_scale = first_estimate(loss="softmax_cross_entropy", trace_floor=None)
  assert np.isnan(ntk_scale)
  np.testing.assert_allclose(scale, gn, rtol=2e-3)
  np.testing.assert_allclose(trace, gn, rtol=2e-3)
  scale, _, _ = first_estimate(loss="softmax_cross_entropy", trace_floor=0.5)
  np.testing.assert_allclose(scale, 0.5 * ntk, rtol=1e-5)
  # Per output, the floor is in the same units: ρ · NTK trace / C.
  scale, _, ntk_scale = first_estimate(loss="softmax_cross_entropy", output_norm="per_output")
  np.testing.assert_allclose(scale, 0.03 * ntk / C, rtol=1e-5)
  np.testing.assert_allclose(ntk_scale, ntk / C, rtol=1e-5)
  # MSE: no floor; S is the NTK trace per output ("auto") or in total.
  np.testing.assert_allclose(first_estimate(loss="mse")[:2], (ntk / C, ntk), rtol=1e-5)
  np.testing.assert_allclose(first_estimate(loss="mse", output_norm="total")[:2], (ntk, ntk),
                             rtol=1e-5)


def test_stats_through_wrappers_and_ambiguity():
  params = init_params()
  inner = controller(0.1)
  for state in (
      inner.init(params),
      optax.MultiSteps(inner, 2).init(params),
      optax.apply_if_finite(inner, 3).init(params),
      optax.inject_hyperparams(optax.sgd)(0.1).init(params) + (inner.init(params),),
      {"a": [inner.init(params)]},
  ):
    s = kstep.stats(state)
    assert set(s) == set(control.ScaleByKControlState.STATS_FIELDS)
  assert int(optax.tree.get(inner.init(params), "k_num_estimates")) == 0
  with pytest.raises(ValueError, match="several kstep transforms"):
    kstep.stats((inner.init(params), inner.init(params)))


def test_apply_if_finite_skips_non_finite_gradients():
  opt = optax.apply_if_finite(controller(1e3, every=1), max_consecutive_errors=5)
  step = jax.jit(lambda g, s, p, b: opt.update(g, s, p, batch=b))
  params = init_params()
  grads = jax.grad(mse_loss)(params, BASE_BATCH)
  state = opt.init(params)
  updates, state = step(grads, state, params, BASE_BATCH)
  assert int(kstep.stats(state)["k_num_estimates"]) == 1
  bad = jax.tree.map(lambda g: g.at[0, 0].set(jnp.nan), grads)
  before = state
  updates, state = step(bad, state, params, BASE_BATCH)
  assert int(state.notfinite_count) == 1
  assert_trees_equal(state.inner_state, before.inner_state)
  np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
  updates, state = step(grads, state, params, BASE_BATCH)
  s = kstep.stats(state)
  assert int(s["k_num_estimates"]) == 2 and int(state.inner_state[-1].count) == 2
  np.testing.assert_allclose(float(s["k"]), BAND[1], rtol=1e-5)
  assert_state_finite(state, guard=False)


# ------------------------------------------------------------------------------------------------
# Convergence


def sampled_batches(data, num_steps, batch_size, seed=0):
  """Stacked mini-batches drawn without replacement within each batch."""
  n = len(jax.tree.leaves(data)[0])
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.choice(n, batch_size, replace=False) for _ in range(num_steps)])
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[idx]), data)


def test_converges_on_a_quadratic():
  # Realisable least squares: the loss is a quadratic with minimum 0. The base LR is 1e3 times
  # the step at K = 1; plain SGD with it diverges.
  n = 128
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, D)).astype(np.float32)
  w_star = rng.normal(size=(D, C)).astype(np.float32)
  data = {"x": x, "y": x @ w_star, "scale": np.ones((n, 1), np.float32)}
  full = jax.tree.map(jnp.asarray, data)
  batches = sampled_batches(data, 300, B)
  base = 1e3 * eta_one(exact_trace(full), 0.9)
  params = {"w": jnp.zeros((D, C))}
  p, state, h = scan_train(controller(base))(params, batches)
  initial, final = float(mse_loss(params, full)), float(mse_loss(p, full))
  assert final < 1e-6 * initial
  np.testing.assert_allclose(np.asarray(p["w"]), w_star, atol=1e-3)
  assert np.all(np.asarray(h["k"]) <= BAND[1] * (1 + 1e-5))
  p_sgd, _, _ = scan_train(optax.sgd(base, momentum=0.9))(params, batches)
  assert not np.isfinite(float(mse_loss(p_sgd, full))) or float(mse_loss(p_sgd, full)) > initial


def regression_data(n=256):
  rng = np.random.default_rng(1)
  x = rng.uniform(-2, 2, size=(n, 2)).astype(np.float32)
  y = (np.sin(2 * x[:, :1]) * np.cos(x[:, 1:])).astype(np.float32)
  return {"x": x, "y": y}


def tanh_apply(params, batch):
  x = batch["x"]
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def regression_run(apply_fn, batch_size, num_steps, config):
  """``train(base_lr)`` -> (final full-data loss, stacked stats); one compile for every LR.
  ``config``: more arguments of the controller (``{}``: its defaults)."""
  data = regression_data()
  full = jax.tree.map(jnp.asarray, data)
  batches = sampled_batches(data, num_steps, batch_size)
  loss = functools.partial(mse_loss, apply_fn=apply_fn)

  @jax.jit
  def train(learning_rate):
    opt = kstep.k_controlled_sgd(
        learning_rate, batch_size=batch_size, apply_fn=apply_fn, momentum=0.9, **config
    )
    p, _, history = scan_train(opt, loss)(mlp_init(0, (2, 64, 64, 1)), batches)
    return loss(p, full), history

  return train, 0.5 * float(np.var(data["y"]))


@pytest.mark.slow
def test_converges_on_a_small_regression_problem():
  # The defaults: one output, so the per-output band (0.25, 0.4) is the band on the trace, and
  # the guard on. The old default, the band (0.4, 0.8) on the trace with no guard, sits at this
  # model's edge: its final loss depended on the probes' draws (0.011-0.058 of the baseline
  # over seeds 0-4, and a divergence at seed 1 after the estimator's rewrite). Measured with the
  # defaults: 0.043 and 0.025 of the baseline at seed 0 (0.019-0.043 over seeds 0-3).
  train, baseline = regression_run(tanh_apply, 16, 1500, {})
  lo, hi = control_defaults.DEFAULT_TARGETS["per_output"]
  for base_lr in (1e-3, 10.0):
    final, history = train(base_lr)
    assert float(final) < 0.05 * baseline
    k = np.asarray(history["k"])
    assert lo * (1 - 1e-5) <= np.median(k) <= hi * (1 + 1e-5)
    assert int(history["k_num_skipped"][-1]) == 0


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="known limitation: the trace bound K does not see the deterministic edge. A ReLU net "
    "loses its units, the NTK trace falls to the output bias's (T = λ_max = 1), the band's upper "
    "edge raises η to 0.8·2αB/T ≈ 5 > 2(1 + μ)/λ_max = 3.8, and the bias diverges.",
)
def test_relu_regression_at_the_upper_edge_does_not_diverge():
  # Over the probes' seeds 0-3 (measured: seeds 2 and 3 end NaN; 0 and 1 happen to survive).
  for seed in range(4):
    train, baseline = regression_run(mlp_apply, 32, 1000, {**LAW, "seed": seed})  # no guard
    final, _ = train(10.0)
    assert np.isfinite(float(final)) and float(final) < baseline


@pytest.mark.slow
def test_curvature_guard_keeps_the_relu_regression_at_the_upper_edge_finite():
  # The run of the known limitation above, annealed over the run (decay_steps, the recipe for a
  # run of known length) and with the curvature guard at its default ratio for MSE: it keeps
  # η·λ_max ≤ 0.5 · 2(1 + μ) and trains on every seed (measured: 0.005-0.09 of the baseline;
  # annealed without the guard seed 3 ends at the baseline, its units dead). With the constant
  # band the guarded run stays identical to a float-rounding change until step ~700, where the
  # net has lost most units, λ_max ≈ 1-3 and η ≈ 0.6-1.4; there 2 of these 4 seeds diverged
  # after the unrolled-VJP change (8c441b5) and none before it: the kinks of a ReLU net, not its
  # curvature, decide that regime, so this test anneals.
  for seed in range(4):
    config = {**LAW, "max_sharpness_ratio": control_defaults.DEFAULT_MAX_SHARPNESS_RATIO,
              "seed": seed, "decay_steps": 1000}
    train, baseline = regression_run(mlp_apply, 32, 1000, config)
    final, history = train(10.0)
    assert np.isfinite(float(final)) and float(final) < 0.5 * baseline, seed
    ratio = np.asarray(history["sharpness_ratio"])
    assert np.all(ratio <= control_defaults.DEFAULT_MAX_SHARPNESS_RATIO * (1 + 1e-5))
    assert int(history["k_num_capped"][-1]) > 0


# ------------------------------------------------------------------------------------------------
# Control on real data: scikit-learn's bundled digits, MLP 64-128-128-10, B = 64, momentum 0.9.

DIGITS_BATCH = 64


@pytest.fixture(scope="module")
def digits():
  datasets = pytest.importorskip("sklearn.datasets")
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm].astype(np.int32)
  return {"x": x[:1400], "label": y[:1400]}, {"x": x[1400:], "label": y[1400:]}


def digits_loss(kind):
  def loss(params, batch):
    logits = mlp_apply(params, batch)
    if kind == "mse":  # ½ Σ_c (f_c − y_c)² with one-hot targets: H = I, the named "mse"
      return 0.5 * jnp.mean(jnp.sum(jnp.square(logits - jax.nn.one_hot(batch["label"], 10)), -1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  return loss


def digits_trainer(digits, kind, num_steps, controlled=True):
  """``train(base_lr)`` -> (final train loss, test accuracy, K per step); one compile per call of
  this function, every base LR then reuses it (the base LR is a traced argument)."""
  train_set, test_set = jax.tree.map(jnp.asarray, digits)
  idx = sampled_batches({"i": np.arange(1400)}, num_steps, DIGITS_BATCH, seed=1)["i"]
  loss = digits_loss(kind)

  @jax.jit
  def train(learning_rate, train_set, test_set, idx):
    if controlled:
      opt = kstep.k_controlled_sgd(
          learning_rate, batch_size=DIGITS_BATCH, apply_fn=mlp_apply, momentum=0.9,
          loss="mse" if kind == "mse" else "softmax_cross_entropy", **LAW,
      )
    else:
      opt = optax.sgd(optax.cosine_decay_schedule(learning_rate, num_steps), momentum=0.9)
    batches = jax.tree.map(lambda a: a[idx], train_set)
    params, state, history = scan_train(opt, loss)(mlp_init(0, (64, 128, 128, 10)), batches)
    accuracy = jnp.mean(jnp.argmax(mlp_apply(params, test_set), -1) == test_set["label"])
    k = history["k"] if controlled else jnp.zeros(num_steps)
    return loss(params, train_set), accuracy, k

  return lambda lr: jax.tree.map(
      np.asarray, train(jnp.float32(lr), train_set, test_set, idx)
  )


def check_digits(digits, kind, learning_rates, num_steps):
  train = digits_trainer(digits, kind, num_steps)
  accuracies = []
  for lr in learning_rates:
    train_loss, accuracy, k = train(lr)
    assert np.all(np.isfinite(k)) and np.isfinite(train_loss), (kind, lr)
    assert BAND[0] * (1 - 1e-5) <= np.median(k) <= BAND[1] * (1 + 1e-5), (kind, lr)
    assert train_loss < (0.05 if kind == "cross_entropy" else 0.03), (kind, lr, train_loss)
    assert accuracy > 0.97, (kind, lr, accuracy)
    accuracies.append(float(accuracy))
  assert max(accuracies) - min(accuracies) < 0.02, (kind, accuracies)
  # The same schedule-free base LRs through optax.sgd with a cosine schedule: 10 diverges.
  train_loss, accuracy, _ = digits_trainer(digits, kind, num_steps, controlled=False)(10.0)
  assert not np.isfinite(train_loss) or accuracy < 0.2, (kind, train_loss, accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_digits_k_stays_in_band_for_any_base_lr(digits, kind):
  # Measured (2,000 steps): MSE accuracy 0.990-0.992, train loss 0.004-0.013; CE accuracy
  # 0.985-0.990, train loss 4e-4-2e-3; median K 0.4 (base 1e-3) and 0.8 (0.1, 10).
  check_digits(digits, kind, (1e-3, 1e-1, 10.0), 2000)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_digits_k_stays_in_band_for_any_base_lr_full(digits, kind):
  check_digits(digits, kind, (1e-3, 1e-2, 1e-1, 1.0, 10.0), 3000)


# ------------------------------------------------------------------------------------------------
# The controller's current API at its edges: K per output, NaN before the first estimate, B read
# from the batch, the checks of `learning_rate` and `seed`, `weight_decay=None`, the docstring.


def test_per_output_k_is_the_total_k_over_the_outputs():
  # Linear model: T = C · mean s²‖x‖² exactly, so per output S = T / C = mean s²‖x‖².
  scales = np.linspace(0.5, 2.0, NUM_STEPS)
  traces = [smoothed(list(T0 * scales[: t + 1] ** 2)) for t in range(NUM_STEPS)]
  alpha = 1 - 0.9
  # A band that never binds: the base step is taken in both norms, K differs by the factor C.
  base = np.float32(0.6 * eta_one(T0, 0.9))
  _, total = run_linear(base, scales, 1e-6, 1e6, output_norm="total")
  _, per = run_linear(base, scales, 1e-6, 1e6, output_norm="per_output")
  for h in (total, per):
    np.testing.assert_array_equal(h["k_learning_rate"], base)
    np.testing.assert_allclose(h["k_trace"], traces, rtol=1e-5)  # k_trace: always the total T
    np.testing.assert_array_equal(h["k_num_outputs"], C)
  np.testing.assert_allclose(total["k_scale"], traces, rtol=1e-5)
  np.testing.assert_allclose(per["k_scale"], np.asarray(traces) / C, rtol=1e-5)
  np.testing.assert_allclose(total["k"], base * np.asarray(traces) / (2 * alpha * B), rtol=1e-5)
  np.testing.assert_allclose(per["k"], total["k"] / C, rtol=1e-6)
  # The band binds (base far above it): per output the same K takes a step C times larger.
  _, total = run_linear(1e3, scales, output_norm="total")
  _, per = run_linear(1e3, scales, output_norm="per_output")
  np.testing.assert_allclose(total["k"], BAND[1], rtol=1e-5)
  np.testing.assert_allclose(per["k"], BAND[1], rtol=1e-5)
  np.testing.assert_allclose(total["k_learning_rate"],
                             BAND[1] * 2 * alpha * B / np.asarray(traces), rtol=1e-5)
  np.testing.assert_allclose(per["k_learning_rate"], C * total["k_learning_rate"], rtol=1e-6)


def test_default_norm_and_band_per_loss():
  params, batch = init_params(), BASE_BATCH
  grads = jax.grad(mse_loss)(params, batch)

  def first_stats(learning_rate, **kwargs):
    opt = kstep.k_controlled_sgd(learning_rate, apply_fn=linear_apply, estimator="exact",
                                 max_sharpness_ratio=None, **kwargs)
    _, state = jax.jit(lambda s: opt.update(grads, s, params, batch=batch))(opt.init(params))
    return kstep.stats(state)

  # MSE: "auto" is per output, the band (0.25, 0.4) on K = η (T/C) / (2αB).
  lo, hi = control_defaults.DEFAULT_TARGETS["per_output"]
  assert (lo, hi) == (0.25, 0.4)
  for base, edge in ((1e3, hi), (1e-6, lo)):
    s = first_stats(base)
    np.testing.assert_allclose(float(s["k"]), edge, rtol=1e-5)
    np.testing.assert_allclose(float(s["k_learning_rate"]), edge * C * eta_one(T0, 0.9),
                               rtol=1e-5)
  # Cross-entropy: "auto" is the total trace, the band (0.7, 0.8) (other losses on the total
  # trace: (0.4, 0.8)).
  assert control.default_target("softmax_cross_entropy", "total") == (0.7, 0.8)
  assert control.default_target("mse", "total") == (0.4, 0.8)
  for base, edge in ((1e3, 0.8), (1e-6, 0.7)):
    s = first_stats(base, loss="softmax_cross_entropy", trace_floor=None)
    np.testing.assert_allclose(float(s["k"]), edge, rtol=1e-5)
    np.testing.assert_allclose(float(s["k_scale"]), float(s["k_trace"]), rtol=1e-6)
  s = first_stats(1e-6, loss="mse", output_norm="total", trace_floor=None)
  np.testing.assert_allclose(float(s["k"]), 0.4, rtol=1e-5)


@pytest.mark.slow
def test_one_output_per_example_is_the_same_k_in_every_norm():
  # Outputs of shape (B,): C = 1, so per output, the largest output and the total agree.
  apply_fn = lambda p, b: b["x"] @ p["w"][:, 0]
  batch = {"x": BASE_BATCH["x"], "y": BASE_BATCH["y"][:, 0]}
  params = init_params()
  grads = jax.grad(lambda p: 0.5 * jnp.mean(jnp.square(apply_fn(p, batch) - batch["y"])))(params)
  t1 = float(np.mean(np.sum(np.asarray(batch["x"], np.float64) ** 2, -1)))
  for norm in ("per_output", "max_output", "total"):
    opt = kstep.k_controlled_sgd(1e3, apply_fn=apply_fn, estimator="exact", output_norm=norm,
                                 max_sharpness_ratio=None, target=BAND)
    _, state = jax.jit(lambda s: opt.update(grads, s, params, batch=batch))(opt.init(params))
    s = kstep.stats(state)
    assert int(s["k_num_outputs"]) == 1, norm
    np.testing.assert_allclose(float(s["k_scale"]), t1, rtol=1e-5, err_msg=norm)
    np.testing.assert_allclose(float(s["k_learning_rate"]), BAND[1] * eta_one(t1, 0.9),
                               rtol=1e-5, err_msg=norm)


def test_stats_read_nan_before_the_first_valid_estimate():
  params = init_params()
  for guard in (False, True):
    opt = controller(0.05, max_sharpness_ratio=0.5 if guard else None)
    s = kstep.stats(opt.init(params))
    for name in MEASURED + GUARD_STATS + ("k_trace_stderr", "k_learning_rate",
                                          "k_base_learning_rate"):
      assert np.isnan(s[name]), name
    for name in ("k_num_outputs", "k_num_estimates", "k_num_skipped", "k_num_raised",
                 "k_num_lowered", "k_num_capped", "sharpness_num_skipped"):
      assert s[name] == 0 and s[name].dtype == jnp.int32, name
  # NaN batches at updates 0 and 1 (the gradients come from the clean batch): nothing measured,
  # both skips counted, the base LR taken; from update 2 on, the band.
  scales = np.array([np.nan, np.nan] + [1.0] * (NUM_STEPS - 2))
  base = 10 * eta_one(T0, 0.9)
  for guard in (False, True):
    (params, state), h = run_linear(base, scales, guard=guard)
    for name in MEASURED + ("k_trace_stderr",) + (GUARD_STATS if guard else ()):
      assert np.all(np.isnan(h[name][:2])), name
      second = name in ("k_trace_stderr", "sharpness_growth")  # needs two valid estimates
      assert np.all(np.isfinite(h[name][2 + second:])), name
    np.testing.assert_array_equal(h["k_num_skipped"], np.minimum(np.arange(1, NUM_STEPS + 1), 2))
    np.testing.assert_array_equal(h["k_num_estimates"], np.maximum(np.arange(-1, NUM_STEPS - 1),
                                                                   0))
    if guard:
      np.testing.assert_array_equal(h["sharpness_num_skipped"], h["k_num_skipped"])
    np.testing.assert_allclose(h["k_learning_rate"][:2], base, rtol=1e-6)
    np.testing.assert_array_equal(h["k_num_raised"][:2] + h["k_num_lowered"][:2], 0)
    np.testing.assert_allclose(h["k"][2:], BAND[1], rtol=1e-5)
    np.testing.assert_allclose(h["k_trace"][2], T0, rtol=1e-5)  # the first valid one sets T̄
    assert_stats_finite(h, guard)
    assert_state_finite(state, guard)
    assert all_finite(params)


def test_nan_batch_at_the_first_update_with_the_defaults():
  # The default controller (per-output band, the guard on, Hutchinson probes) sees a batch with
  # a NaN input at update 0; the gradients come from a clean batch.
  opt = kstep.k_controlled_sgd(0.05, apply_fn=linear_apply)
  nan_batch = dict(BASE_BATCH, x=BASE_BATCH["x"].at[0, 0].set(jnp.nan))
  step = make_step(opt)
  params, state = init_params(), opt.init(init_params())
  params, state, _ = step(params, state, nan_batch, BASE_BATCH)
  s = kstep.stats(state)
  for name in MEASURED + GUARD_STATS + ("k_trace_stderr",):
    assert np.isnan(s[name]), name
  assert int(s["k_num_skipped"]) == 1 and int(s["sharpness_num_skipped"]) == 1
  assert int(s["k_num_estimates"]) == 0
  assert float(s["k_learning_rate"]) == float(s["k_base_learning_rate"]) == np.float32(0.05)
  assert all_finite(params)
  assert_state_finite(state, guard=True)
  # The next estimate (update 10, `every` = 10) on a clean batch sets everything.
  for _ in range(10):
    params, state, _ = step(params, state, BASE_BATCH, BASE_BATCH)
  s = kstep.stats(state)
  assert int(s["k_num_estimates"]) == 1 and int(s["k_num_skipped"]) == 1
  assert np.isfinite(float(s["k"])) and np.isfinite(float(s["gn_lambda_max"]))
  assert all_finite(params)
  assert_state_finite(state, guard=True)


def test_batch_size_mismatch_names_both_numbers():
  params = init_params()
  short = make_batch(0, n=6)
  grads = jax.grad(mse_loss)(params, short)
  for opt in (
      controller(0.1),
      optax.chain(optax.clip_by_global_norm(1.0), controller(0.1)),
      kstep.scale_by_k_control(0.1, batch_size=B, apply_fn=linear_apply),
  ):
    state = opt.init(params)
    for update in (opt.update, jax.jit(opt.update)):
      with pytest.raises(ValueError, match="`batch_size`") as info:
        update(grads, state, params, batch=short)
      assert re.search(rf"\b{B}\b", str(info.value)) and re.search(r"\b6\b", str(info.value))
  # batch_size=None (the default) reads B from each batch: K uses the batch's own size.
  opt = controller(1e3, batch_size=None)
  for batch in (BASE_BATCH, short):
    n = batch["x"].shape[0]
    g = jax.grad(mse_loss)(params, batch)
    _, state = jax.jit(lambda s, b, g: opt.update(g, s, params, batch=b))(opt.init(params), batch,
                                                                           g)
    np.testing.assert_allclose(float(kstep.stats(state)["k_learning_rate"]),
                               BAND[1] * eta_one(exact_trace(batch), 0.9, n), rtol=1e-5)


@pytest.mark.parametrize(
    "learning_rate", [-0.5, 0.0, -1e-8, np.float32(-1.0), jnp.asarray(-0.5), np.nan, "0.1", None]
)
def test_learning_rate_must_be_positive(learning_rate):
  for factory in (kstep.k_controlled_sgd, kstep.scale_by_k_control):
    with pytest.raises(ValueError, match="`learning_rate`"):
      factory(learning_rate, apply_fn=linear_apply)
  # A schedule is checked by the user (its values may be anything); a positive float passes.
  kstep.k_controlled_sgd(optax.constant_schedule(0.1), apply_fn=linear_apply)
  kstep.k_controlled_sgd(0.5, apply_fn=linear_apply)


def test_seed_makes_the_key_in_init():
  params = init_params()
  opt = controller(0.1, seed=7)
  state = opt.init(params)
  np.testing.assert_array_equal(np.asarray(control_state(state).key),
                                np.asarray(jax.random.PRNGKey(7)))
  assert_trees_equal(state, opt.init(params))  # init is a pure function of params
  assert not np.array_equal(np.asarray(control_state(controller(0.1, seed=8).init(params)).key),
                            np.asarray(control_state(state).key))


@pytest.mark.parametrize("weight_decay", [pytest.param(None, marks=pytest.mark.slow), 0.0, 1e-4])
def test_injected_state_has_the_plain_tree(weight_decay):
  params = init_params()
  kwargs = {} if weight_decay is None else {"weight_decay": weight_decay}
  plain = kstep.k_controlled_sgd(0.1, apply_fn=linear_apply, **kwargs)
  injected = optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=("apply_fn",))(
      0.1, apply_fn=linear_apply, **kwargs
  )
  plain_state, injected_state = plain.init(params), injected.init(params)
  assert jax.tree.structure(injected_state.inner_state) == jax.tree.structure(plain_state)
  assert ("weight_decay" in injected_state.hyperparams) == (weight_decay is not None)
  if weight_decay is None:  # optax.sgd's chain: momentum, then the step (here the controller)
    sgd = optax.inject_hyperparams(optax.sgd)(0.1, momentum=0.9).init(params).inner_state
    assert len(plain_state) == len(sgd) == 2
    assert jax.tree.structure(plain_state[0]) == jax.tree.structure(sgd[0])
    assert isinstance(plain_state[0], optax.TraceState)
    assert isinstance(plain_state[1], control.ScaleByKControlState)
  else:  # weight decay is a part of the chain, injected or not
    assert len(plain_state) == 3
  if weight_decay is not None:
    return
  # The tree stays after a jitted update (the static arguments listed for optax).
  static = ("apply_fn", "num_probes", "sharpness_iters", "probe_batch_size")
  injected = optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=static)(
      0.1, apply_fn=linear_apply, **kwargs
  )
  state = injected.init(params)
  _, state, _ = make_step(injected)(params, state, BASE_BATCH, BASE_BATCH)
  assert jax.tree.structure(state.inner_state) == jax.tree.structure(plain_state)
  assert avals(state) == avals(injected.init(params))


@pytest.mark.slow
def test_k_controlled_sgd_docstring_example_runs():
  out = io.StringIO()
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  examples = doctest.DocTestFinder().find(control.k_controlled_sgd, "k_controlled_sgd", globs={})
  for example in examples:
    runner.run(example, out=out.write)
  result = runner.summarize(verbose=False)
  assert result.attempted >= 10 and result.failed == 0, out.getvalue()
