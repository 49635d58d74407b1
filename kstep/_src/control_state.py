"""State of the K controller (:func:`kstep.scale_by_k_control`), one NamedTuple of arrays, and
how one estimate (:class:`kstep._src.k_estimate.KEstimate`) updates it (:func:`absorb`)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kstep._src import k_estimate

Array = jax.Array

SHARPNESS_HOLD = 0.8
# Near the guard's cap its power steps may skip every other estimate while λ is steady: the last
# refresh found λ̂ at most this factor above the λ̄ the cap had used (next_estimate).
SHARPNESS_STEADY = 1.1
# ``next_estimate``: what the next update's estimate is (kstep.value_and_grad reads it too).
NONE, COLD, FULL, LIGHT = 0, 1, 2, 3


class ScaleByKControlState(NamedTuple):
  """State of :func:`scale_by_k_control`. Scalars are float32 unless said otherwise.

  Attributes:
    count: updates applied so far (int32).
    key: PRNG key of the probes (made in ``init`` from ``seed``; folded with ``count``).
    k: K at the step taken by the last update, ``η S̄ / (2 α B)``, in the chosen output norm.
    k_scale: S̄, the smoothed kernel scale (T/C, λ_max(M) or T, see ``output_norm``).
    k_trace: T̄, the smoothed per-example Gauss–Newton / NTK trace over all outputs.
    k_trace_raw: the last valid raw estimate T̂.
    k_trace_stderr: standard error of T̄ from the spread of the raw estimates around it (NaN
      until two estimates exist).
    k_trace_var: running mean of the squared deviations of T̂ from T̄ (feeds the stderr).
    k_ntk_scale: Ŝ_NTK, the trace floor's NTK scale from its last probe (NaN without a floor).
    k_learning_rate: η actually taken by the last update.
    k_base_learning_rate: the base η (schedule value) at the last update.
    k_num_outputs: C, outputs per example (int32; 0 before the first update).
    k_num_estimates: valid estimates so far (int32).
    k_num_skipped: estimates skipped as NaN/Inf/≤ 0 (int32).
    k_num_raised: updates whose step the band raised above the base LR (int32).
    k_num_lowered: updates whose step the band (or ``max_scale``) lowered below the base LR.
    k_num_capped: updates whose step the curvature guard lowered (int32).
    gn_lambda_max: λ̄, the Gauss–Newton λ_max of the last valid guard estimate.
    sharpness_ratio: ``η · λ̄ / E(μ)`` at the last update (1 is the curvature edge).
    sharpness_num_estimates: estimates whose power steps ran and gave a valid λ (int32; see
      ``refresh_every``).
    sharpness_num_skipped: λ estimates skipped as NaN/Inf/≤ 0 (int32).
    sharpness_growth: λ̂ / λ̄ at the last valid λ estimate, λ̄ the value the cap had used until
      then (> 1: λ outgrew it); NaN until two exist.
    gn_eigenvector: the guard's power-iteration vector (float32, shaped like params), or ``()``
      with the guard off.
    next_estimate: the next update's estimate (int32): ``NONE``, ``COLD`` (the first: whole
      batch, more probes and power steps), ``FULL`` (with the guard's power steps and the
      floor's NTK probe) or ``LIGHT`` (reusing λ̄, its vector and the floor's NTK scale).
  """

  count: Array
  key: Array
  k: Array
  k_scale: Array
  k_trace: Array
  k_trace_raw: Array
  k_trace_stderr: Array
  k_trace_var: Array
  k_ntk_scale: Array
  k_learning_rate: Array
  k_base_learning_rate: Array
  k_num_outputs: Array
  k_num_estimates: Array
  k_num_skipped: Array
  k_num_raised: Array
  k_num_lowered: Array
  k_num_capped: Array
  gn_lambda_max: Array
  sharpness_ratio: Array
  sharpness_num_estimates: Array
  sharpness_num_skipped: Array
  sharpness_growth: Array
  gn_eigenvector: Any
  next_estimate: Array

  STATS_FIELDS = (
      "k", "k_scale", "k_trace", "k_trace_raw", "k_trace_stderr", "k_ntk_scale", "k_learning_rate",
      "k_base_learning_rate", "k_num_outputs", "k_num_estimates", "k_num_skipped",
      "k_num_raised", "k_num_lowered", "k_num_capped", "gn_lambda_max", "sharpness_ratio",
      "sharpness_num_estimates", "sharpness_num_skipped", "sharpness_growth",
  )


def next_estimate(state: ScaleByKControlState, *, every: int, refresh_every: int,
                  near: Array | None) -> Array:
  """``state.next_estimate`` for the update after ``state`` (its ``count`` already advanced):
  ``NONE`` between estimates, ``COLD`` until the first valid estimate, ``FULL`` at every
  ``refresh_every``-th estimate and whenever ``near`` (the last step came near the guard's cap,
  or there is no λ̄ yet), else ``LIGHT``. Near the cap, an odd-numbered estimate is ``LIGHT``
  too while λ is steady (``sharpness_growth ≤ SHARPNESS_STEADY``): then the cap's λ̄ is at most
  one refresh (two estimates) old, and λ grew by at most 10 % over the last one."""
  count = state.count
  n = count // every
  full = n % refresh_every == 0
  if near is not None:
    steady = (state.sharpness_growth <= SHARPNESS_STEADY) & (n % 2 == 1)
    full = full | (near & ~steady)
  mode = jnp.where(state.k_num_estimates == 0, COLD, jnp.where(full, FULL, LIGHT))
  return jnp.where(count % every == 0, mode, NONE).astype(jnp.int32)


def absorb(state: ScaleByKControlState, est: k_estimate.KEstimate, *, first: bool, full: bool,
           guard: bool, smoothing: Any, max_change: Any) -> ScaleByKControlState:
  """``state`` after the estimate ``est`` (static: ``first``, the first valid one; ``full``, its
  power steps ran; without them λ̄, the vector and the guard's counts are left as they are).
  Smoothing: ``S̄ ← d·S̄ + (1 − d)·clip(Ŝ, S̄/r, r·S̄)`` (the first sets S̄), T̄ the
  same with the raw T̂ moved by the clip applied to Ŝ. An invalid Ŝ (NaN, ±Inf, ≤ 0) or λ̂ is
  counted and changes nothing else; λ̄ is max-held: ``λ̄ ← max(λ̂, SHARPNESS_HOLD·λ̄)``."""
  valid = jnp.isfinite(est.scale) & (est.scale > 0) & jnp.isfinite(est.trace)
  old = jnp.where(first, est.scale, state.k_scale)
  clipped = jnp.clip(est.scale, old / max_change, old * max_change)
  scale = jnp.where(first, est.scale, smoothing * old + (1.0 - smoothing) * clipped)
  # T̄ follows S̄: the same weights, the raw T̂ moved by the clip applied to Ŝ.
  raw_t = est.trace * clipped / jnp.where(est.scale > 0, est.scale, 1.0)
  trace = jnp.where(first, est.trace, smoothing * state.k_trace + (1.0 - smoothing) * raw_t)
  dev2 = jnp.square(est.trace - trace)
  var = jnp.where(first, 0.0, smoothing * state.k_trace_var + (1.0 - smoothing) * dev2)
  # An EMA with weight (1 − d) averages about (1 + d)/(1 − d) estimates; one has no spread.
  stderr = jnp.where(first, jnp.nan, jnp.sqrt(var * (1.0 - smoothing) / (1.0 + smoothing)))
  keep = lambda new, old_value: jnp.where(valid, new, old_value).astype(old_value.dtype)
  state = state._replace(
      k_scale=keep(scale, state.k_scale), k_trace=keep(trace, state.k_trace),
      k_trace_raw=keep(est.trace, state.k_trace_raw), k_trace_var=keep(var, state.k_trace_var),
      k_trace_stderr=keep(stderr, state.k_trace_stderr),
      k_ntk_scale=keep(est.ntk_scale, state.k_ntk_scale),
      k_num_estimates=state.k_num_estimates + valid.astype(jnp.int32),
      k_num_skipped=state.k_num_skipped + (~valid).astype(jnp.int32),
  )
  if not (guard and full):
    return state
  # The vector is finite by construction (k_estimate.power_update keeps the previous one where a
  # product is not), so it is kept as it comes: no pass over it.
  lam_ok = jnp.isfinite(est.lambda_max) & (est.lambda_max > 0)
  growth = est.lambda_max / state.gn_lambda_max  # NaN while λ̄ is (before the first λ)
  return state._replace(
      # Max-hold: a new estimate below the decayed previous one (a sub-batch whose top
      # direction differs, a lagging warm start) lowers λ̄ by at most the factor SHARPNESS_HOLD.
      gn_lambda_max=jnp.where(
          lam_ok, jnp.fmax(est.lambda_max, SHARPNESS_HOLD * state.gn_lambda_max),
          state.gn_lambda_max,
      ),
      gn_eigenvector=jax.tree.map(lambda n, o: n.astype(o.dtype), est.eigenvector,
                                  state.gn_eigenvector),
      sharpness_num_estimates=state.sharpness_num_estimates + lam_ok.astype(jnp.int32),
      sharpness_num_skipped=state.sharpness_num_skipped + (~lam_ok).astype(jnp.int32),
      sharpness_growth=jnp.where(lam_ok, growth, state.sharpness_growth).astype(jnp.float32),
  )
