"""Tracks Batch Sharpness (EoSS, Definition 1) of any optimizer along training."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep._src import arguments, estimators, periodic
from kstep._src.diagnostics import common
from kstep._src.estimators import AxisName

Array = jax.Array
PyTree = Any
ScalarOrSchedule = optax.ScalarOrSchedule


class TrackBatchSharpnessState(NamedTuple):
  """State of :func:`track_batch_sharpness`.

  Attributes:
    count: updates seen so far (int32).
    moments: running moments of ``(g_Bᵀ H_B g_B, ‖g_B‖², ratio)`` over the measured batches.
    batch_sharpness: ``mean[gᵀHg] / mean[‖g‖²]``, the ratio of running means (EoSS
      Definition 1).
    batch_sharpness_stderr: its standard error (delta method).
    batch_sharpness_mean_of_ratios: ``mean[gᵀHg / ‖g‖²]`` (what the EoSS authors' code reports
      mostly).
    batch_sharpness_mean_of_ratios_stderr: its standard error.
    batch_sharpness_last: ``gᵀHg / ‖g‖²`` of the last measured batch alone.
    batch_sharpness_edge_ratio_small_batch: ``η · batch_sharpness / (2(1 − μ))``, η the learning
      rate at this update and μ the momentum: 1 on the small-batch plateau ``2(1 − μ)/η``.
    batch_sharpness_edge_ratio_large_batch: ``η · batch_sharpness / (2(1 + μ))``: 1 on the
      large-batch plateau ``2(1 + μ)/η``. With μ = 0 both ratios are ``η · batch_sharpness / 2``.
    batch_sharpness_num_measurements: valid measurements so far.
    batch_sharpness_num_skipped: measurements dropped as NaN/Inf.

  The measured values (``batch_sharpness``, ``batch_sharpness_mean_of_ratios``,
  ``batch_sharpness_last``, the edge ratios) read NaN before the first valid measurement; the
  standard errors until two exist; the edge ratios without a ``learning_rate``.
  """

  count: Array
  moments: common.Moments
  batch_sharpness: Array
  batch_sharpness_stderr: Array
  batch_sharpness_mean_of_ratios: Array
  batch_sharpness_mean_of_ratios_stderr: Array
  batch_sharpness_last: Array
  batch_sharpness_edge_ratio_small_batch: Array
  batch_sharpness_edge_ratio_large_batch: Array
  batch_sharpness_num_measurements: Array
  batch_sharpness_num_skipped: Array

  STATS_FIELDS = (
      "batch_sharpness", "batch_sharpness_stderr", "batch_sharpness_mean_of_ratios",
      "batch_sharpness_mean_of_ratios_stderr", "batch_sharpness_last",
      "batch_sharpness_edge_ratio_small_batch", "batch_sharpness_edge_ratio_large_batch",
      "batch_sharpness_num_measurements", "batch_sharpness_num_skipped",
  )


def track_batch_sharpness(
    loss_fn: Callable[[PyTree, Any], Array],
    *,
    every: int,
    learning_rate: ScalarOrSchedule | None = None,
    momentum: float = 0.0,
    decay: float | None = 0.95,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Records Batch Sharpness (Andreyev & Beneventano, EoSS, Definition 1) along training.

  ``BatchSharpness = E_B[g_Bᵀ H_B g_B] / E_B[‖g_B‖²]``: the curvature of each mini-batch loss
  ``L_B`` along its own gradient ``g_B = ∇L_B``, with ``H_B = ∇²L_B``, averaged over batches as a
  ratio of expectations. EoSS's claim: under mini-batch SGD with step η, after progressive
  sharpening Batch Sharpness reaches ``2/η`` and hovers there while the full-batch λ_max
  (:func:`track_lambda_max`) stays below ``2/η``, the lower the smaller the batch. With
  heavy-ball momentum μ the plateau depends on the batch size: ``2(1 − μ)/η`` for small batches,
  ``2(1 + μ)/η`` for large ones ("Momentum Further Constrains Sharpness at the Edge of Stochastic
  Stability", 2026). Given ``learning_rate``, both ratios are reported:
  ``batch_sharpness_edge_ratio_small_batch = η · BatchSharpness / (2(1 − μ))`` and
  ``batch_sharpness_edge_ratio_large_batch = η · BatchSharpness / (2(1 + μ))``; the one for the
  run's regime reads ≈ 1 at the EoSS (with μ = 0 they coincide, ``η · BatchSharpness / 2``).

  Every ``every`` updates the pair ``(g_Bᵀ H_B g_B, ‖g_B‖²)`` is measured on the current batch
  (keyword ``batch=``) at ``params`` with :func:`kstep._src.estimators.batch_curvature`; the
  expectations over B are running means over the measured batches (exponentially weighted with
  ``decay``, see the module docstring), so the estimate follows the drifting curvature.
  Also reported: the running mean of the per-batch ratios ``g_Bᵀ H_B g_B / ‖g_B‖²`` (a batch with
  ``g_B = 0`` counts as 0), which is what the authors' public code reports mostly; both come with
  standard errors. The two differ: the ratio of means weighs batches by ``‖g_B‖²``.

  Cost per measurement: one gradient and one Hessian-vector product (forward-over-reverse).

  Args:
    loss_fn: scalar mini-batch loss ``loss_fn(params, batch)`` (the loss being optimised).
    every: measure on updates 0, ``every``, ``2·every``, …
    learning_rate: η, a float or an optax schedule of the update count (the step the optimizer
      takes), for the edge ratios; ``None`` leaves them NaN.
    momentum: μ in [0, 1), the optimizer's heavy-ball momentum in optax's convention
      (``optax.sgd(η, momentum=μ)``: ``t ← g + μ t``, ``θ ← θ − η t``); 0 for plain SGD.
    decay: weight d in [0, 1) of the past in the running means (about ``(1 + d)/(1 − d)``
      measurements averaged), or ``None`` for the all-time mean. The default 0.95 averages about
      40 measurements, enough for a stable ratio with small batches, short enough to follow
      progressive sharpening.
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split over (the batch is the
      union of the shards; two all-reduces of P floats per measurement). Not needed under
      ``jax.jit`` with sharded arrays.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`TrackBatchSharpnessState`.

  Raises:
    ValueError: at construction, naming the argument that is out of range; in ``init`` and
      ``update`` for complex ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, kstep
    >>> loss_fn = lambda p, batch: 0.5 * jnp.sum(batch * p**2)  # H_B = diag(batch)
    >>> params, batch = jnp.array([1.0, 1.0]), jnp.array([1.0, 3.0])
    >>> opt = optax.chain(
    ...     optax.sgd(0.1, momentum=0.5),
    ...     kstep.track_batch_sharpness(loss_fn, every=1, learning_rate=0.1, momentum=0.5))
    >>> state = opt.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch)  # g = (1, 3): gᵀHg / ‖g‖² = 28 / 10
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> s = kstep.stats(state)
    >>> round(float(s["batch_sharpness"]), 4)
    2.8
    >>> round(float(s["batch_sharpness_edge_ratio_small_batch"]), 4)  # 0.1 · 2.8 / (2 · 0.5)
    0.28
    >>> round(float(s["batch_sharpness_edge_ratio_large_batch"]), 4)  # 0.1 · 2.8 / (2 · 1.5)
    0.0933
  """
  arguments.check_callable("loss_fn", loss_fn, "loss_fn(params, batch) -> scalar")
  arguments.check_positive_int("every", every)
  arguments.check_learning_rate(learning_rate, optional=True)
  arguments.check_momentum(momentum)
  arguments.check_decay(decay)
  every = arguments.static_or_traced_int(every)

  def init_fn(params: PyTree) -> TrackBatchSharpnessState:
    arguments.check_real_params(params, "track_batch_sharpness")
    return TrackBatchSharpnessState(
        count=common.izero(), moments=common.moments_init(3), batch_sharpness=common.nan(),
        batch_sharpness_stderr=common.nan(), batch_sharpness_mean_of_ratios=common.nan(),
        batch_sharpness_mean_of_ratios_stderr=common.nan(), batch_sharpness_last=common.nan(),
        batch_sharpness_edge_ratio_small_batch=common.nan(),
        batch_sharpness_edge_ratio_large_batch=common.nan(),
        batch_sharpness_num_measurements=common.izero(), batch_sharpness_num_skipped=common.izero(),
    )

  def measure(state: TrackBatchSharpnessState, params: PyTree, batch: Any):
    num, den = estimators.batch_curvature(loss_fn, params, batch, axis_name=axis_name)
    num, den = common.f32(num), common.f32(den)
    valid = jnp.isfinite(num) & jnp.isfinite(den) & (den >= 0)
    ratio = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    m = common.moments_update(state.moments, jnp.stack([num, den, ratio]), decay)
    mn, md, mr = m.mean[0], m.mean[1], m.mean[2]
    bs = jnp.where(md > 0, mn / jnp.where(md > 0, md, 1.0), 0.0)
    c = m.comoment
    resid = c[0, 0] - 2.0 * bs * c[0, 1] + bs * bs * c[1, 1]  # Σ w (num − bs·den)²
    bs_se = jnp.where(md > 0, common.stderr_of_mean(m, resid) / jnp.where(md > 0, md, 1.0), 0.0)
    new = state._replace(
        moments=m, batch_sharpness=bs, batch_sharpness_stderr=bs_se,
        batch_sharpness_mean_of_ratios=mr,
        batch_sharpness_mean_of_ratios_stderr=common.stderr_of_mean(m, c[2, 2]),
        batch_sharpness_last=ratio,
    )
    return common.accept(valid, new, state, "batch_sharpness")

  def update_fn(updates, state: TrackBatchSharpnessState, params=None, **extra_args):
    common.check_params(params, "track_batch_sharpness")
    arguments.check_real_params(params, "track_batch_sharpness")
    batch = common.get_batch(extra_args, "track_batch_sharpness")
    new_state = periodic.when_due(state.count, every, updates,
                                  lambda s: measure(s, params, batch), state)
    bs = new_state.batch_sharpness  # NaN before the first valid measurement
    return periodic.release(updates, bs), new_state._replace(
        count=optax.safe_increment(state.count),
        batch_sharpness_edge_ratio_small_batch=common.edge_ratio(
            learning_rate, state.count, bs, 2.0 * (1.0 - momentum)),
        batch_sharpness_edge_ratio_large_batch=common.edge_ratio(
            learning_rate, state.count, bs, 2.0 * (1.0 + momentum)),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
