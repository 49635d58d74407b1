"""The K controller's band law on the linear model with exact traces: K as reported, the base LR
clipped into the band (or passed unchanged inside it), the counters, schedules, ``max_scale``, and
the output norms (K per output, the default band per loss, one output per example).

Most tests here run ``control_helpers.run_linear`` (``LAW``: K on the total trace, no guard, the
band (0.4, 0.8)); the guard's physics is tested in ``test_control_physics.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from control_helpers import (
  BAND,
  BASE_BATCH,
  NUM_STEPS,
  T0,
  B,
  C,
  eta_one,
  init_params,
  linear_apply,
  mse_loss,
  run_linear,
  smoothed,
)

import kstep
from kstep._src import options


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


# ------------------------------------------------------------------------------------------------
# Output norms: K per output, the default band per loss, one output per example.


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

  def first_stats(learning_rate, output_norm="auto", **kwargs):
    opt = kstep.k_controlled_sgd(
        learning_rate, apply_fn=linear_apply, guard=None,
        estimate=kstep.Estimate(estimator="exact", output_norm=output_norm), **kwargs)
    _, state = jax.jit(lambda s: opt.update(grads, s, params, batch=batch))(opt.init(params))
    return kstep.stats(state)

  # MSE: "auto" is per output, the band (0.25, 0.4) on K = η (T/C) / (2αB).
  lo, hi = options.DEFAULT_TARGETS["per_output"]
  assert (lo, hi) == (0.25, 0.4)
  for base, edge in ((1e3, hi), (1e-6, lo)):
    s = first_stats(base)
    np.testing.assert_allclose(float(s["k"]), edge, rtol=1e-5)
    np.testing.assert_allclose(float(s["k_learning_rate"]), edge * C * eta_one(T0, 0.9),
                               rtol=1e-5)
  # Cross-entropy: "auto" is the total trace, the band (0.7, 0.8) (other losses on the total
  # trace: (0.4, 0.8)).
  assert options.default_target("softmax_cross_entropy", "total") == (0.7, 0.8)
  assert options.default_target("mse", "total") == (0.4, 0.8)
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
    opt = kstep.k_controlled_sgd(1e3, apply_fn=apply_fn, guard=None, target=BAND,
                                 estimate=kstep.Estimate(estimator="exact", output_norm=norm))
    _, state = jax.jit(lambda s: opt.update(grads, s, params, batch=batch))(opt.init(params))
    s = kstep.stats(state)
    assert int(s["k_num_outputs"]) == 1, norm
    np.testing.assert_allclose(float(s["k_scale"]), t1, rtol=1e-5, err_msg=norm)
    np.testing.assert_allclose(float(s["k_learning_rate"]), BAND[1] * eta_one(t1, 0.9),
                               rtol=1e-5, err_msg=norm)


@pytest.mark.parametrize("batch_size, micro", [(None, 1), (3, 1), (6, 2)])
def test_sequence_outputs_count_every_position_as_an_example(batch_size, micro):
  """(B, T, V) logits with cross-entropy: K = η S_tok / (2(1 − μ) B T), S_tok the mean
  per-position Gauss–Newton trace (dense reference) and ``batch_size`` counting sequences."""
  from control_helpers import dense_per_token_trace, sequence_model

  apply_fn, params, batch = sequence_model()
  (b, t), v = batch["x"].shape, 5
  s_tok = dense_per_token_trace(apply_fn, params, batch)

  opt = kstep.k_controlled_sgd(1e4, apply_fn=apply_fn, loss="softmax_cross_entropy",
                               momentum=0.9, batch_size=batch_size, guard=None,
                               trace_floor=None, estimate=kstep.Estimate(estimator="exact"))
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(opt.update)(grads, opt.init(params), params, batch=batch)
  s = kstep.stats(state)
  np.testing.assert_allclose(float(s["k_trace"]), s_tok, rtol=1e-4)
  assert int(s["k_num_outputs"]) == v
  rows = b * t * micro
  eta = float(s["k_learning_rate"])
  np.testing.assert_allclose(float(s["k"]), eta * s_tok / (2 * 0.1 * rows), rtol=1e-4)
  hi = options.default_target("softmax_cross_entropy", "total")[1]
  np.testing.assert_allclose(float(s["k"]), hi, rtol=1e-4)  # lowered into the band
