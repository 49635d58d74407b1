"""How the K controller's estimates enter its state: the first one at update 0, one every
``Estimate.every`` updates, smoothed and clipped (``Estimate.smoothing``, ``Estimate.max_change``);
invalid ones (NaN, Inf, ≤ 0) skipped and counted, the stats NaN until the first valid one; the
trace floor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from control_helpers import (
  BAND,
  BASE_BATCH,
  GUARD_STATS,
  MEASURED,
  NUM_STEPS,
  T0,
  C,
  D,
  all_finite,
  assert_state_finite,
  assert_stats_finite,
  controller,
  eta_one,
  init_params,
  linear_apply,
  make_step,
  run,
  run_linear,
  smoothed,
)

import kstep
from kstep._src import options


def test_first_estimate_happens_at_the_first_update():
  _, h = run_linear(1e3, every=10)
  assert h["k_num_estimates"][0] == 1
  np.testing.assert_allclose(h["k_trace"][0], T0, rtol=1e-5)
  np.testing.assert_allclose(h["k"][0], BAND[1], rtol=1e-5)  # corrected before the first step
  np.testing.assert_array_equal(h["k_num_estimates"], [1] * 10 + [2] * 2)


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


# ------------------------------------------------------------------------------------------------
# Invalid estimates and the NaN stats before the first valid one


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

  every1 = kstep.Estimate(output_norm="total", estimator="exact", every=1)
  for guard in (False, True):  # the guard's λ (a Rayleigh quotient, negative here) is skipped too
    opt = controller(0.05, loss=negative_loss, estimate=every1,
                     guard=kstep.Guard(ratio=0.5) if guard else None)
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


def test_nan_outputs_with_cross_entropy_floor_are_skipped():
  # Without a guard the floor's NTK probe runs at every 8th estimate (Guard's default
  # refresh_every): the NaN batch at update 1 meets a light estimate (the Gauss–Newton probe
  # only), the one at update 8 a full one (the NTK probe too). Both are skipped.
  scales = np.array([1.0, np.nan] + [1.0] * 6 + [np.nan] + [1.0] * 3)
  (params, state), h = run_linear(1e3, scales, loss="softmax_cross_entropy",
                                  estimator="hutchinson")
  np.testing.assert_array_equal(h["k_num_skipped"][:3], [0, 1, 1])
  assert h["k_learning_rate"][1] == h["k_learning_rate"][0]
  np.testing.assert_array_equal(h["k_num_skipped"][7:10], [1, 2, 2])
  assert h["k_learning_rate"][8] == h["k_learning_rate"][7]
  assert h["k_ntk_scale"][8] == h["k_ntk_scale"][0]  # the NaN probe never reaches Ŝ_NTK
  assert_state_finite(state, guard=False, floor=True)
  assert all_finite(params)


def test_stats_read_nan_before_the_first_valid_estimate():
  params = init_params()
  for guard in (False, True):
    opt = controller(0.05, guard=kstep.Guard(ratio=0.5) if guard else None)
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
  # The next estimate (update 10, `Estimate.every` = 10) on a clean batch sets everything.
  for _ in range(10):
    params, state, _ = step(params, state, BASE_BATCH, BASE_BATCH)
  s = kstep.stats(state)
  assert int(s["k_num_estimates"]) == 1 and int(s["k_num_skipped"]) == 1
  assert np.isfinite(float(s["k"])) and np.isfinite(float(s["gn_lambda_max"]))
  assert all_finite(params)
  assert_state_finite(state, guard=True)


# ------------------------------------------------------------------------------------------------
# The trace floor


@pytest.mark.slow
def test_trace_floor_auto():
  assert options.resolve_trace_floor("auto", "softmax_cross_entropy") == 0.03
  assert options.resolve_trace_floor("auto", "sigmoid_binary_cross_entropy") == 0.03
  assert options.resolve_trace_floor("auto", "mse") is None
  assert options.resolve_trace_floor("auto", lambda out, batch: out.sum(-1)) is None
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

  def first_estimate(output_norm="auto", **kwargs):
    """(S, T, Ŝ_NTK) after the first update: the floored kernel scale, the trace itself and the
    floor's NTK scale."""
    opt = kstep.k_controlled_sgd(
        0.1, batch_size=C, apply_fn=linear_apply, guard=None,
        estimate=kstep.Estimate(estimator="exact", output_norm=output_norm), **kwargs,
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
