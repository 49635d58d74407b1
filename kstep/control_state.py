"""State of the K controller (:func:`kstep.scale_by_k_control`): one NamedTuple of arrays."""

from typing import Any, NamedTuple

import jax

Array = jax.Array


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
    sharpness_num_skipped: λ estimates skipped as NaN/Inf/≤ 0 (int32).
    gn_eigenvector: the guard's power-iteration vector (float32, shaped like params), or ``()``
      with the guard off.
  """

  count: Array
  key: Array
  k: Array
  k_scale: Array
  k_trace: Array
  k_trace_raw: Array
  k_trace_stderr: Array
  k_trace_var: Array
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
  sharpness_num_skipped: Array
  gn_eigenvector: Any

  STATS_FIELDS = (
      "k", "k_scale", "k_trace", "k_trace_raw", "k_trace_stderr", "k_learning_rate",
      "k_base_learning_rate", "k_num_outputs", "k_num_estimates", "k_num_skipped",
      "k_num_raised", "k_num_lowered", "k_num_capped", "gn_lambda_max", "sharpness_ratio",
      "sharpness_num_skipped",
  )
