"""The K controller: SGD/momentum whose step keeps the noise kernel norm inside a target band.

``K = η T / (2 α B)`` (K paper eq. 11/18/87) with T the per-example NTK trace (MSE) or
Gauss–Newton trace (other losses), α = 1 − momentum and B the batch size. Every ``every`` steps,
inside the jitted update (``lax.cond``), the controller estimates T on the current batch with
:func:`kstep.gauss_newton_trace` (one forward and one VJP per probe), smooths it across estimates,
and at every step takes

    η_t = clip(η_base(t), lo(t) · η₁, hi(t) · η₁),   η₁ = 2 α B / T̄   (the step at which K = 1),

optionally capped at ``max_scale · η_base(t)``. A base LR whose K is inside the band passes
unchanged; outside, the step is moved to the nearest edge. Between estimates T̄ is held, so K
follows the step actually taken (K ∝ η).

Smoothing: ``T̄ ← d·T̄ + (1 − d)·clip(T̂, T̄/r, r·T̄)`` with ``d = smoothing`` and ``r = max_change``:
one noisy probe moves T̄ (hence η) by at most a factor ``1 + (1 − d)(r − 1)`` up and
``1 − (1 − d)(1 − 1/r)`` down. The first valid estimate sets T̄ directly, so a far-off base LR is
corrected before the first update. An estimate that is NaN, ±Inf or ≤ 0 is skipped and counted;
T̄, the step and the state keep their previous (finite) values.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep import estimators, losses, noise_kernel

Array = jax.Array
ScalarOrSchedule = optax.ScalarOrSchedule

ESTIMATORS = ("hutchinson", "exact")


class ScaleByKControlState(NamedTuple):
  """State of :func:`scale_by_k_control`; every field but ``key`` is a scalar array.

  Attributes:
    count: updates applied so far (int32).
    key: PRNG key for the probes, ``jax.random.PRNGKey(seed)`` (uint32, shape ``(2,)``; folded
      with ``count`` at each estimate).
    trace: smoothed trace T̄ (0 until the first valid estimate).
    trace_raw: the last valid raw estimate T̂.
    trace_stderr: standard error of T̄ from the spread of the raw estimates around it (0 after
      the first estimate, which has no spread to measure).
    trace_var: running mean of the squared deviations of T̂ from T̄ (feeds ``trace_stderr``).
    k: K at the step taken by the last update, ``η T̄ / (2 α B)``.
    learning_rate: η actually taken by the last update.
    base_learning_rate: the base η (schedule value) at the last update.
    num_estimates: valid estimates so far.
    num_skipped: estimates skipped as NaN/Inf/≤ 0.
    num_raised: updates whose step the band raised above the base LR.
    num_lowered: updates whose step the band lowered below the base LR.
  """

  count: Array
  key: Array
  trace: Array
  trace_raw: Array
  trace_stderr: Array
  trace_var: Array
  k: Array
  learning_rate: Array
  base_learning_rate: Array
  num_estimates: Array
  num_skipped: Array
  num_raised: Array
  num_lowered: Array

  STATS_FIELDS = (
      "k", "trace", "trace_raw", "trace_stderr", "learning_rate", "base_learning_rate",
      "num_estimates", "num_skipped", "num_raised", "num_lowered",
  )


def _is_number(x: Any) -> bool:
  """True for values known at construction (Python/NumPy numbers, concrete arrays)."""
  if isinstance(x, numbers.Number):
    return True
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.ndim == 0


def _is_python_zero(x: Any) -> bool:
  """True for a zero given as a Python/NumPy scalar (not an array, concrete or traced)."""
  return isinstance(x, numbers.Number) and float(x) == 0.0


def _check_int(name: str, value: Any) -> None:
  if _is_number(value) and (int(value) != value or value < 1):
    raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


def _check_band(target: Any) -> None:
  try:
    lo, hi = target
  except (TypeError, ValueError):
    msg = f"`target` must be a pair (lo, hi) with 0 < lo < hi; got {target!r}."
    raise ValueError(msg) from None
  if _is_number(lo) and _is_number(hi) and not 0 < float(lo) < float(hi):
    raise ValueError(f"`target` must satisfy 0 < lo < hi; got ({lo!r}, {hi!r}).")
  for end in (lo, hi):
    if _is_number(end) or callable(end) or isinstance(end, jax.Array):
      continue
    raise ValueError(f"`target` ends must be floats or schedules; got {end!r}.")


def _check_momentum(momentum: Any) -> None:
  if _is_number(momentum) and not 0.0 <= float(momentum) < 1.0:
    raise ValueError(f"`momentum` must be in [0, 1); got {momentum!r}.")


CROSS_ENTROPY_TRACE_FLOOR = 0.03


def _resolve_trace_floor(trace_floor: float | str | None, loss: Any) -> float | Array | None:
  if isinstance(trace_floor, str) and trace_floor == "auto":
    named_ce = isinstance(loss, str) and loss.endswith("cross_entropy")
    return CROSS_ENTROPY_TRACE_FLOOR if named_ce else None
  if trace_floor is None:
    return None
  if isinstance(trace_floor, jax.core.Tracer) and jnp.ndim(trace_floor) == 0:
    return trace_floor  # injected inside jit (optax.inject_hyperparams): cannot be checked
  if not _is_number(trace_floor) or float(trace_floor) < 0:
    raise ValueError(f'`trace_floor` must be a number >= 0, "auto" or None; got {trace_floor!r}.')
  return trace_floor


def _value(x: ScalarOrSchedule, count: Array) -> Array:
  return jnp.asarray(x(count) if callable(x) else x, jnp.float32)


def _missing_batch_error() -> ValueError:
  return ValueError(
      "kstep's K controller estimates the trace on the batch the gradients came from: call "
      "`opt.update(grads, state, params, batch=batch)` (inside optax.chain the keyword is "
      "forwarded; with flax nnx, `optimizer.update(model, grads, batch=batch)`)."
  )


def scale_by_k_control(
    learning_rate: ScalarOrSchedule,
    *,
    batch_size: int,
    apply_fn: Callable[[Any, Any], Array],
    loss: str | Callable[..., Array] = "mse",
    target: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.4, 0.8),
    momentum: float = 0.0,
    every: int = 10,
    num_probes: int = 1,
    estimator: str = "hutchinson",
    smoothing: float = 0.8,
    max_change: float = 4.0,
    max_scale: float | None = None,
    trace_floor: float | str | None = "auto",
    seed: int | Array = 0,
    flip_sign: bool = True,
    axis_name: estimators.AxisName = None,
    probe_scope: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by ``−η_t``, the step that keeps K inside ``target`` (see module docstring).

  The drop-in replacement for ``optax.scale_by_learning_rate`` at the end of an SGD/momentum
  chain; :func:`k_controlled_sgd` is the assembled optimizer. ``update`` needs ``params`` and the
  extra keyword ``batch=`` (the batch the gradients came from; ``apply_fn(params, batch)``).

  Args:
    learning_rate: base LR η_base, a float or an optax schedule of the step count.
    batch_size: B, examples per batch, as in the K formula.
    apply_fn: ``apply_fn(params, batch)`` -> outputs ``(B, C)`` or ``(B,)``.
    loss: as in :func:`kstep.gauss_newton_trace` (``"mse"``, ``"softmax_cross_entropy"``,
      ``"sigmoid_binary_cross_entropy"`` or a per-example callable ``(outputs, batch) -> (B,)``).
    target: ``(lo, hi)``, the K band; each end a float or a schedule, ``0 < lo < hi``.
    momentum: μ of the momentum that precedes this transform (only used in K: α = 1 − μ).
    every: estimate the trace every ``every`` updates (the first at update 0).
    num_probes: probes per estimate.
    estimator: ``"hutchinson"`` (stochastic, cheap) or ``"exact"`` (per-example Jacobians).
    smoothing: d in [0, 1), the weight of the old T̄ in each new estimate.
    max_change: r > 1, the most one raw estimate may differ from T̄ (as a factor).
    max_scale: if given, the step never exceeds ``max_scale · η_base``.
    trace_floor: ρ ≥ 0: each raw estimate becomes ``max(T̂, ρ · T̂_NTK)``, the NTK trace of the
      outputs (logits) measured on the same batch with one more probe. ``"auto"`` (default) uses
      ρ = 0.03 for the cross-entropies and no floor for MSE and callables; ``None`` disables it.
      Why: as a softmax saturates, the Gauss–Newton trace collapses (×1e-4 on digits) while the
      logits' NTK trace does not; without a floor the band raises the step without bound and
      training dies (see the README's "Cross-entropy" section for the measurement).
    seed: PRNG seed of the probes.
    flip_sign: multiply by ``−η`` (descent) rather than ``η``.
    axis_name: inside ``shard_map``/``pmap`` with the batch split over this axis (or tuple of
      axes), combine the devices' contributions to each estimate (``batch_size`` is then the
      global B and params must be replicated over the axis). Not needed under ``jax.jit`` with
      sharded arrays. See :func:`kstep.gauss_newton_trace`.
    probe_scope: ``"global"`` (the single-device estimate, one all-reduce of P floats per probe)
      or ``"per_shard"`` (independent probes per device, one scalar all-reduce per probe, lower
      variance); only with ``axis_name``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByKControlState`.

  Raises:
    ValueError: at construction, naming the argument that is out of range.
  """
  _check_band(target)
  _check_int("batch_size", batch_size)
  _check_int("every", every)
  _check_int("num_probes", num_probes)
  if isinstance(num_probes, jax.core.Tracer):
    raise ValueError(
        "`num_probes` sets the number of probes (a shape) and must be a static Python int; under "
        "optax.inject_hyperparams list it in `static_args`."
    )
  if _is_number(num_probes):
    num_probes = int(num_probes)
  _check_momentum(momentum)
  if not callable(apply_fn):
    raise ValueError(f"`apply_fn` must be callable apply_fn(params, batch); got {apply_fn!r}.")
  losses.resolve_loss(loss)
  if estimator not in ESTIMATORS:
    raise ValueError(f"`estimator` must be one of {ESTIMATORS}; got {estimator!r}.")
  estimators.check_probe_scope(probe_scope, axis_name)
  if _is_number(smoothing) and not 0.0 <= float(smoothing) < 1.0:
    raise ValueError(f"`smoothing` must be in [0, 1); got {smoothing!r}.")
  if _is_number(max_change) and not float(max_change) > 1.0:
    raise ValueError(f"`max_change` must be > 1; got {max_change!r}.")
  if max_scale is not None and _is_number(max_scale) and not float(max_scale) > 0.0:
    raise ValueError(f"`max_scale` must be > 0 or None; got {max_scale!r}.")
  trace_floor = _resolve_trace_floor(trace_floor, loss)
  lo_sched, hi_sched = target
  sign = -1.0 if flip_sign else 1.0

  def init_fn(params: Any) -> ScaleByKControlState:
    del params
    zero = jnp.zeros((), jnp.float32)
    izero = jnp.zeros((), jnp.int32)
    return ScaleByKControlState(
        count=izero, key=jax.random.PRNGKey(seed), trace=zero, trace_raw=zero, trace_stderr=zero,
        trace_var=zero, k=zero, learning_rate=zero, base_learning_rate=zero,
        num_estimates=izero, num_skipped=izero, num_raised=izero, num_lowered=izero,
    )

  def estimate(state: ScaleByKControlState, params: Any, batch: Any) -> ScaleByKControlState:
    key = jax.random.fold_in(state.key, state.count)
    trace = lambda loss_, key_: estimators.gauss_newton_trace(
        apply_fn, params, batch, loss=loss_, key=key_, num_probes=num_probes, method=estimator,
        axis_name=axis_name, probe_scope=probe_scope,
    ).value
    raw = trace(loss, key)
    if trace_floor is not None:
      raw = jnp.maximum(raw, trace_floor * trace("mse", jax.random.fold_in(key, 1)))
    valid = jnp.isfinite(raw) & (raw > 0)
    raw = jnp.where(valid, raw, state.trace_raw)
    first = state.num_estimates == 0
    old = jnp.where(first, raw, state.trace)
    clipped = jnp.clip(raw, old / max_change, old * max_change)
    new = jnp.where(first, raw, smoothing * old + (1.0 - smoothing) * clipped)
    dev2 = jnp.square(raw - new)
    var = jnp.where(first, dev2, smoothing * state.trace_var + (1.0 - smoothing) * dev2)
    # An EMA with weight (1 − d) averages about (1 + d)/(1 − d) estimates.
    stderr = jnp.sqrt(var * (1.0 - smoothing) / (1.0 + smoothing))
    keep = lambda new_value, old_value: jnp.where(valid, new_value, old_value)
    return state._replace(
        trace=keep(new, state.trace), trace_raw=raw, trace_var=keep(var, state.trace_var),
        trace_stderr=keep(stderr, state.trace_stderr),
        num_estimates=state.num_estimates + valid.astype(jnp.int32),
        num_skipped=state.num_skipped + (~valid).astype(jnp.int32),
    )

  def update_fn(updates, state: ScaleByKControlState, params=None, **extra_args):
    batch = extra_args.get("batch")
    if batch is None:
      raise _missing_batch_error()
    if params is None:
      raise ValueError("kstep's K controller needs `params`: opt.update(grads, state, params, "
                       "batch=batch).")
    state = jax.lax.cond(
        state.count % every == 0,
        lambda s: estimate(s, params, batch),
        lambda s: s,
        state,
    )
    count = state.count
    base = _value(learning_rate, count)
    lo, hi = _value(lo_sched, count), _value(hi_sched, count)
    alpha = 1.0 - jnp.asarray(momentum, jnp.float32)
    has_trace = state.trace > 0
    eta_one = 2.0 * alpha * jnp.asarray(batch_size, jnp.float32) / jnp.where(
        has_trace, state.trace, 1.0
    )
    eta = jnp.where(has_trace, jnp.clip(base, lo * eta_one, hi * eta_one), base)
    if max_scale is not None:
      eta = jnp.minimum(eta, max_scale * base)
    k = noise_kernel.k_from_trace(eta, batch_size, state.trace, momentum)
    updates = jax.tree.map(lambda u: (sign * eta * u).astype(u.dtype), updates)
    return updates, state._replace(
        count=optax.safe_increment(count), k=k, learning_rate=eta, base_learning_rate=base,
        num_raised=state.num_raised + (eta > base).astype(jnp.int32),
        num_lowered=state.num_lowered + (eta < base).astype(jnp.int32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def k_controlled_sgd(
    learning_rate: ScalarOrSchedule,
    *,
    batch_size: int,
    apply_fn: Callable[[Any, Any], Array],
    loss: str | Callable[..., Array] = "mse",
    target: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.4, 0.8),
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    every: int = 10,
    num_probes: int = 1,
    estimator: str = "hutchinson",
    smoothing: float = 0.8,
    max_change: float = 4.0,
    max_scale: float | None = None,
    trace_floor: float | str | None = "auto",
    seed: int | Array = 0,
    axis_name: estimators.AxisName = None,
    probe_scope: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum whose step keeps the noise kernel norm K inside ``target``.

  ``optax.chain(add_decayed_weights(weight_decay), trace(momentum, nesterov),
  scale_by_k_control(learning_rate, ...))``: the same chain as ``optax.sgd`` with the final
  learning-rate scaling replaced by the K controller (see :func:`scale_by_k_control` for the
  control law and every argument). Pass the batch to ``update``::

      opt = kstep.k_controlled_sgd(0.1, batch_size=128, apply_fn=model.apply)
      updates, state = opt.update(grads, state, params, batch=batch)
      kstep.stats(state)["k"]

  Under ``optax.inject_hyperparams``, list ``apply_fn`` (and a callable ``loss``) in
  ``static_args``: it treats every callable as a schedule. ``num_probes`` must be static too (it is
  a shape); the other numbers may be injected.

  Raises:
    ValueError: at construction, naming the argument that is out of range.
  """
  if _is_number(weight_decay) and float(weight_decay) < 0:
    raise ValueError(f"`weight_decay` must be >= 0; got {weight_decay!r}.")
  _check_momentum(momentum)
  # Which parts the chain holds must not depend on whether a value is concrete: under
  # optax.inject_hyperparams `init` sees concrete arrays and a jitted `update` sees tracers, so
  # only a Python zero (static) drops a part; an array zero keeps it (a no-op) in both.
  parts = []
  if not _is_python_zero(weight_decay):
    parts.append(optax.add_decayed_weights(weight_decay))
  if not _is_python_zero(momentum):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(
      scale_by_k_control(
          learning_rate, batch_size=batch_size, apply_fn=apply_fn, loss=loss, target=target,
          momentum=momentum, every=every, num_probes=num_probes, estimator=estimator,
          smoothing=smoothing, max_change=max_change, max_scale=max_scale,
          trace_floor=trace_floor, seed=seed, axis_name=axis_name, probe_scope=probe_scope,
      )
  )
  return optax.chain(*parts)
