"""Tracks the noise kernel norm K of any SGD/momentum run (K paper eq. 11/18/87)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep import arguments, estimators, losses, noise_kernel
from kstep.diagnostics import common
from kstep.estimators import AxisName

Array = jax.Array
PyTree = Any
ScalarOrSchedule = optax.ScalarOrSchedule


class TrackKState(NamedTuple):
  """State of :func:`track_k`.

  Attributes:
    count: updates seen so far (int32).
    key: PRNG key of the probes (folded with ``count``).
    moments: running moments of the raw trace estimates.
    k: ``η_t T̄ / (2 (1 − μ) B)`` at this update's learning rate η_t (0 before any measurement).
    k_trace: T̄, the running mean of the trace estimates (per-example Gauss–Newton / NTK trace).
    k_trace_stderr: its standard error from the spread of the estimates (NaN until two exist).
    k_trace_raw: the last valid raw estimate T̂.
    k_learning_rate: η_t used for ``k``.
    k_num_measurements: valid estimates so far.
    k_num_skipped: estimates dropped as NaN/Inf/≤ 0.
  """

  count: Array
  key: Array
  moments: common.Moments
  k: Array
  k_trace: Array
  k_trace_stderr: Array
  k_trace_raw: Array
  k_learning_rate: Array
  k_num_measurements: Array
  k_num_skipped: Array

  STATS_FIELDS = (
      "k", "k_trace", "k_trace_stderr", "k_trace_raw", "k_learning_rate", "k_num_measurements",
      "k_num_skipped",
  )


def track_k(
    apply_fn: Callable[[PyTree, Any], Array],
    *,
    loss: str | Callable[..., Array] = "mse",
    batch_size: int,
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    every: int = 10,
    num_probes: int = 1,
    estimator: str = "hutchinson",
    decay: float | None = 0.8,
    seed: int | Array = 0,
    axis_name: AxisName = None,
    probe_scope: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Records the noise kernel norm K (Agarwala & Pennington 2024) of any SGD/momentum run.

  ``K = η / (2 α B) · T`` (K paper eq. 11; momentum eq. 18; general loss eq. 87/130) with
  ``α = 1 − μ`` and ``T = (1/B) Σ_i tr(J_iᵀ H_i J_i)`` the per-example Gauss–Newton trace (the NTK
  trace for ``loss="mse"`` with ℓ = ½‖f − y‖²). K ≈ 1 is the stochastic edge of stability; good
  training sits around K ∈ [0.4, 0.8]. The same measurement as the K controller
  (:func:`kstep.scale_by_k_control`) without the control: every ``every`` updates T is estimated
  on the current batch (keyword ``batch=``) with :func:`kstep.gauss_newton_trace`, averaged over
  measurements (``decay``, see the module docstring), and at every update
  ``k = k_from_trace(η_t, B, T̄, μ)`` with η_t the learning rate at that update, so K follows a
  schedule between measurements.

  It reports ``k`` like the controller: chained together, :func:`kstep.stats` raises on the
  duplicate name (read each with ``optax.tree.get`` on its own sub-state).

  Cost per measurement: one forward pass and ``num_probes`` VJPs (``"hutchinson"`` with a named
  loss; one JVP per probe for a callable loss), or B per-example Jacobians (``"exact"``).

  Args:
    apply_fn: ``apply_fn(params, batch)`` -> outputs ``(B, C)`` or ``(B,)``.
    loss: ``"mse"``, ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or a callable
      ``loss(outputs, batch) -> (B,)`` (see :func:`kstep.gauss_newton_trace`).
    batch_size: B, examples per batch.
    learning_rate: η, a float or an optax schedule of the update count (the step the optimizer
      takes).
    momentum: μ of the optimizer's heavy-ball momentum (optax convention), α = 1 − μ.
    every: measure on updates 0, ``every``, ``2·every``, …
    num_probes: probes per Hutchinson estimate.
    estimator: ``"hutchinson"`` (stochastic, cheap) or ``"exact"`` (per-example Jacobians).
    decay: weight d in [0, 1) of the past in the running mean of T (0: the last estimate
      alone; the controller's default smoothing is 0.8), or ``None`` for the all-time mean.
    seed: int seed (or PRNG key) of the probes.
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split over (``batch_size``
      is the global B). Not needed under ``jax.jit`` with sharded arrays.
    probe_scope: ``"global"`` or ``"per_shard"``, as in :func:`kstep.gauss_newton_trace`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`TrackKState`.

  Raises:
    ValueError: at construction, naming the argument that is out of range.
  """
  arguments.check_callable("apply_fn", apply_fn, "apply_fn(params, batch) -> outputs")
  losses.resolve_loss(loss)
  arguments.check_positive_int("batch_size", batch_size)
  arguments.check_learning_rate(learning_rate, optional=False)
  arguments.check_momentum(momentum)
  arguments.check_positive_int("every", every)
  num_probes = arguments.check_static_int(
      "num_probes", num_probes, "sets the number of probes (a shape)"
  )
  if estimator not in estimators.METHODS:
    raise ValueError(f"`estimator` must be one of {estimators.METHODS}; got {estimator!r}.")
  estimators.check_probe_scope(probe_scope, axis_name)
  arguments.check_decay(decay)
  base_key = arguments.prng_key(seed)
  every = arguments.static_or_traced_int(every)

  def init_fn(params: PyTree) -> TrackKState:
    del params
    return TrackKState(
        count=common.izero(), key=base_key, moments=common.moments_init(1), k=common.zero(),
        k_trace=common.zero(),
        k_trace_stderr=common.nan(), k_trace_raw=common.zero(), k_learning_rate=common.zero(),
        k_num_measurements=common.izero(), k_num_skipped=common.izero(),
    )

  def measure(state: TrackKState, params: PyTree, batch: Any) -> TrackKState:
    key = jax.random.fold_in(state.key, state.count)
    raw = estimators.gauss_newton_trace(
        apply_fn, params, batch, loss=loss, key=key, num_probes=num_probes, method=estimator,
        axis_name=axis_name, probe_scope=probe_scope,
    ).value
    raw = common.f32(raw)
    valid = jnp.isfinite(raw) & (raw > 0)
    m = common.moments_update(state.moments, raw[None], decay)
    new = state._replace(
        moments=m, k_trace=m.mean[0], k_trace_stderr=common.stderr_of_mean(m, m.comoment[0, 0]),
        k_trace_raw=raw,
    )
    return common.accept(valid, new, state, "k")

  def update_fn(updates, state: TrackKState, params=None, **extra_args):
    common.check_params(params, "track_k")
    batch = common.get_batch(extra_args, "track_k")
    new_state = jax.lax.cond(
        state.count % every == 0, lambda s: measure(s, params, batch), lambda s: s, state
    )
    eta = arguments.schedule_value(learning_rate, state.count)
    k = noise_kernel.k_from_trace(eta, batch_size, new_state.k_trace, momentum)
    return updates, new_state._replace(
        count=optax.safe_increment(state.count), k=common.f32(k), k_learning_rate=eta
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
