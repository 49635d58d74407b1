"""The K controller's curvature guard (``kstep.Guard``): when its power steps run
(``Guard.refresh_every``, near the cap, while λ is steady) and the ratio ``"auto"`` per loss.

The guard's physics (the edge it keeps below, large-batch training) is tested in
``test_control_physics.py``; its skipped estimates in ``test_control_estimates.py``.
"""

from __future__ import annotations

import jax
import numpy as np
from control_helpers import (
  NUM_STEPS,
  assert_stats_finite,
  init_params,
  linear_apply,
  make_batch,
  mse_loss,
  run_linear,
)

import kstep
from kstep._src import options
from kstep._src.control_state import SHARPNESS_STEADY


def test_refresh_every_runs_guard_and_floor_at_every_m_th_estimate_far_below_the_cap():
  # every=1, refresh_every=3, the band far below the cap: the power steps and the floor's NTK
  # probe run at estimates 0, 3, 6, 9 only; λ̄ and Ŝ_NTK are held in between although the
  # outputs' scale (so λ and the NTK trace) changes at every step.
  scales = np.linspace(1.0, 2.0, NUM_STEPS)
  _, h = run_linear(1e3, scales, guard=True, refresh_every=3, loss="softmax_cross_entropy",
                    estimator="hutchinson")
  refresh = np.arange(NUM_STEPS) % 3 == 0
  assert np.all(h["sharpness_ratio"] < options.SHARPNESS_NEAR * 0.5)
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


def test_guard_ratio_auto_by_loss():
  auto = kstep.Guard()
  assert auto.ratio == "auto"
  assert options.resolve_guard_ratio(auto, "softmax_cross_entropy") == 0.25
  assert options.resolve_guard_ratio(auto, "sigmoid_binary_cross_entropy") == 0.25
  assert options.resolve_guard_ratio(auto, "mse") == 0.5
  assert options.resolve_guard_ratio(auto, lambda out, batch: out.sum(-1)) == 0.5
  assert options.resolve_guard_ratio(kstep.Guard(ratio=0.3), "softmax_cross_entropy") == 0.3
  assert options.resolve_guard_ratio(None, "mse") is None
  # The cap the guard applies is the resolved one: η·λ̄ = r·E once the step is capped.
  batch = make_batch(0, scale=30.0)
  for loss, r in (("mse", 0.5), ("softmax_cross_entropy", 0.25)):
    opt = kstep.k_controlled_sgd(1e3, apply_fn=linear_apply, loss=loss, trace_floor=None,
                                 target=(1e3, 2e3), estimate=kstep.Estimate(estimator="exact"))
    params = init_params()
    grads = jax.grad(mse_loss)(params, batch)
    _, state = jax.jit(lambda s: opt.update(grads, s, params, batch=batch))(opt.init(params))
    np.testing.assert_allclose(float(kstep.stats(state)["sharpness_ratio"]), r, rtol=1e-4)
