"""Tracks the noise kernel norm K of any SGD/momentum run (K paper eq. 11/18/87)."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep._src import arguments, estimators, k_estimate, losses, noise_kernel, periodic
from kstep._src.diagnostics import common
from kstep._src.estimators import AxisName
from kstep._src.preconditioners import Preconditioner

Array = jax.Array
PyTree = Any
ScalarOrSchedule = optax.ScalarOrSchedule


class TrackKState(NamedTuple):
  """State of :func:`track_k`.

  Attributes:
    count: updates seen so far (int32).
    key: PRNG key of the probes (folded with ``count``).
    moments: running moments of the raw estimates ``(T̂, Ŝ)``.
    k: ``η_t S̄ / (2 (1 − μ) B)`` at this update's learning rate η_t, in the chosen output norm.
    k_scale: S̄, the running mean of the kernel scale (T/C, λ_max(M) or T; ``output_norm``).
    k_trace: T̄, the running mean of the trace estimates (per-example Gauss–Newton / NTK trace).
    k_trace_stderr: its standard error from the spread of the estimates (NaN until two exist).
    k_trace_raw: the last valid raw estimate T̂.
    k_learning_rate: η_t used for ``k``.
    k_num_outputs: C, outputs per example (int32; 0 before the first update).
    k_num_measurements: valid estimates so far.
    k_num_skipped: estimates dropped as NaN/Inf/≤ 0.

  Measured values (``k``, ``k_scale``, ``k_trace``, ``k_trace_raw``) read NaN until the first
  valid measurement.
  """

  count: Array
  key: Array
  moments: common.Moments
  k: Array
  k_scale: Array
  k_trace: Array
  k_trace_stderr: Array
  k_trace_raw: Array
  k_learning_rate: Array
  k_num_outputs: Array
  k_num_measurements: Array
  k_num_skipped: Array

  STATS_FIELDS = (
      "k", "k_scale", "k_trace", "k_trace_stderr", "k_trace_raw", "k_learning_rate",
      "k_num_outputs", "k_num_measurements", "k_num_skipped",
  )


def track_k(
    apply_fn: Callable[[PyTree, Any], Array],
    *,
    loss: str | Callable[..., Array] = "mse",
    learning_rate: ScalarOrSchedule,
    batch_size: int | None = None,
    output_norm: str = "auto",
    momentum: float = 0.0,
    every: int = 10,
    num_probes: int = 1,
    estimator: str = "hutchinson",
    decay: float | None = 0.8,
    seed: int = 0,
    axis_name: AxisName = None,
    probe_scope: str = "global",
    preconditioner: Preconditioner | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Records the noise kernel norm K (Agarwala & Pennington 2024) of any SGD/momentum run.

  ``K = η / (2 α B) · S`` (K paper eq. 11; momentum eq. 18; general loss eq. 87/130) with
  ``α = 1 − μ`` and S the kernel scale of :mod:`kstep._src.k_estimate`: for ``output_norm="auto"``
  the NTK trace per output ``T/C`` for MSE and callables, the Gauss–Newton trace
  ``T = (1/B) Σ_i tr(J_iᵀ H_i J_i)`` for the cross-entropies. K ≈ 1 is the stochastic edge of
  stability (≈ 2 for cross-entropy, App. D.7). The same measurement as the K controller
  (:func:`kstep.scale_by_k_control`) without the control: every ``every`` updates S and T are
  estimated on the current batch (keyword ``batch=``) with :func:`kstep._src.k_estimate.estimate`,
  averaged over measurements (``decay``, see :mod:`kstep._src.diagnostics`), and at every update
  ``k = k_from_trace(η_t, B, S̄, μ)`` with η_t the learning rate at that update, so K follows a
  schedule between measurements.

  With a ``preconditioner`` (Adam's: :func:`kstep.adam_preconditioner`) it records K_P, the
  norm of the preconditioned kernel ``J P⁻¹ Jᵀ``: it then *is* the preconditioner's link of the
  chain (``optax.chain(track_k(..., preconditioner=kstep.adam_preconditioner()),
  optax.scale_by_learning_rate(η))`` is Adam), reads P from its own state and, for an EMA
  momentum (β₁), reports ``K_P = η S_P / (2B)`` (``docs/design.md``, "Adaptive optimizers").

  It reports ``k`` like the controller: chained together, :func:`kstep.stats` raises on the
  duplicate name (read each with ``optax.tree.get`` on its own sub-state).

  Cost per measurement: one forward pass and ``num_probes`` VJPs (``"hutchinson"`` with a named
  loss; one JVP per probe for a callable loss; C VJPs per probe for ``"max_output"``), or B
  per-example Jacobians (``"exact"``).

  Args:
    apply_fn: ``apply_fn(params, batch)`` -> outputs ``(B, C)`` or ``(B,)``; ``(B, T, V)``
      logits with ``"softmax_cross_entropy"`` are ``B·T`` rows of ``V``.
    loss: ``"mse"``, ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or a callable
      ``loss(outputs, batch) -> (B,)`` (see :func:`kstep.gauss_newton_trace`).
    learning_rate: η, a float or an optax schedule of the update count (the step the optimizer
      takes).
    batch_size: B, examples per batch; ``None`` reads it from the outputs (a given value that
      differs from the batch raises ``ValueError``).
    output_norm: ``"auto"``, ``"per_output"``, ``"max_output"`` or ``"total"``, as in
      :func:`kstep.k_controlled_sgd`.
    momentum: μ of the optimizer's heavy-ball momentum (optax convention), α = 1 − μ.
    every: measure on updates 0, ``every``, ``2·every``, …
    num_probes: probes per Hutchinson estimate.
    estimator: ``"hutchinson"`` (stochastic, cheap) or ``"exact"`` (per-example Jacobians).
    decay: weight d in [0, 1) of the past in the running mean of T (0: the last estimate
      alone; the controller's default smoothing is 0.8), or ``None`` for the all-time mean.
    seed: int seed of the probes (the key is made in ``init``).
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split over (``batch_size``
      is the global B). Not needed under ``jax.jit`` with sharded arrays.
    probe_scope: ``"global"`` or ``"per_shard"``, as in :func:`kstep.gauss_newton_trace`.
    preconditioner: a :class:`kstep.Preconditioner` to run and measure through, or ``None``
      (pass-through; the kernel ``J Jᵀ``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`TrackKState` (inside a
    ``PreconditionedTrackerState`` with a ``preconditioner``).

  Raises:
    ValueError: at construction, naming the argument that is out of range.
  """
  arguments.check_callable("apply_fn", apply_fn, "apply_fn(params, batch) -> outputs")
  spec = losses.resolve_loss(loss)
  norm = k_estimate.resolve_output_norm(output_norm, loss)
  if batch_size is not None:
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
  arguments.check_seed(seed)  # the key itself is made in init
  every = arguments.static_or_traced_int(every)
  momentum, ema = common.momentum_and_ema(preconditioner, momentum)

  def init_fn(params: PyTree) -> TrackKState:
    del params
    nan = common.nan()
    return TrackKState(
        count=common.izero(), key=arguments.prng_key(seed), moments=common.moments_init(2),
        k=nan, k_scale=nan, k_trace=nan, k_trace_stderr=nan, k_trace_raw=nan,
        k_learning_rate=nan, k_num_outputs=common.izero(), k_num_measurements=common.izero(),
        k_num_skipped=common.izero(),
    )

  def measure(state: TrackKState, params: PyTree, batch: Any, inv_sqrt) -> TrackKState:
    est = k_estimate.estimate(
        apply_fn, params, batch, loss=spec, key=jax.random.fold_in(state.key, state.count),
        output_norm=norm, num_probes=num_probes, estimator=estimator, axis_name=axis_name,
        probe_scope=probe_scope, inv_sqrt=None if inv_sqrt is None else inv_sqrt(),
    )
    valid = jnp.isfinite(est.trace) & jnp.isfinite(est.scale) & (est.scale > 0)
    m = common.moments_update(state.moments, jnp.stack([est.trace, est.scale]), decay)
    new = state._replace(
        moments=m, k_trace=m.mean[0], k_scale=m.mean[1],
        k_trace_stderr=common.stderr_of_mean(m, m.comoment[0, 0]), k_trace_raw=est.trace,
    )
    return common.accept(valid, new, state, "k")

  def update_fn(updates, state: TrackKState, params, extra_args, inv_sqrt):
    common.check_params(params, "track_k")
    batch = common.get_batch(extra_args, "track_k")
    b, c = k_estimate.batch_rows(apply_fn, params, batch, batch_size, axis_name=axis_name,
                                 loss=spec)
    new_state = periodic.when_due(state.count, every, updates,
                                  lambda s: measure(s, params, batch, inv_sqrt), state)
    eta = arguments.schedule_value(learning_rate, state.count)
    k = noise_kernel.k_from_trace(eta, b, new_state.k_scale, 0.0 if ema else momentum)
    return periodic.release(updates, new_state.k_scale), new_state._replace(
        count=optax.safe_increment(state.count), k=common.f32(k), k_learning_rate=eta,
        k_num_outputs=jnp.asarray(c, jnp.int32),
    )

  return common.with_preconditioner(preconditioner, init_fn, update_fn)
