"""Pass-through diagnostics: λ_max, Batch Sharpness and K of any optimizer, measured inside jit.

Each function here returns an ``optax.GradientTransformationExtraArgs`` that returns its
``updates`` unchanged (the same arrays, bit for bit) and records measurements in its state, a
NamedTuple of scalar arrays whose class attribute ``STATS_FIELDS`` names what it reports. Chain it
before or after any optimizer and read the values with :func:`kstep.stats` or
``optax.tree.get(state, name)``::

    opt = optax.chain(
        optax.sgd(0.05),
        kstep.track_lambda_max(loss_fn, every=50),
        kstep.track_batch_sharpness(loss_fn, every=5, learning_rate=0.05),
    )
    updates, state = opt.update(grads, state, params, batch=batch)
    kstep.stats(state)  # {"lambda_max": ..., "batch_sharpness": ..., "edge_ratio": ..., ...}

``update`` needs ``params`` (the parameters the gradients were taken at) and the extra keyword
``batch=`` (``optax.chain`` forwards extra keywords to every member); :func:`track_lambda_max`
also accepts a fixed ``measure_batch=`` (e.g. the whole training set). Measurements happen on
update 0, ``every``, ``2·every``, … inside a ``lax.cond``: nothing leaves the device and the other
updates cost nothing beyond a few scalar operations. A measurement that comes out NaN or ±Inf is
dropped: the reported values keep their previous (finite) values and ``*_num_skipped`` counts it.

Names are unique across the three trackers, so all three fit in one chain. The K controller
(:func:`kstep.scale_by_k_control`) also reports ``k``: with both in one state, :func:`kstep.stats`
raises, and each value must be read from its own sub-state (a controlled run has no use for
:func:`track_k` anyway).

Data parallel: under ``jax.jit`` with a sharded batch the trackers need nothing; inside
``shard_map``/``pmap`` pass ``axis_name`` (the axis the batch is split over) and they measure on
the global batch, the same numbers as one device (see :mod:`kstep.estimators`).

Under ``optax.inject_hyperparams``, list ``loss_fn`` / ``apply_fn`` (and a callable ``loss``) in
``static_args`` (it treats every callable as a schedule), and ``num_iters`` / ``num_probes`` too:
they set shapes, and a traced value raises an error saying so. The other numbers (``every``,
``learning_rate``, ``decay``, ``tol``, ``momentum``, ``batch_size``) may be injected: ``init``
checks their concrete values, a jitted ``update`` uses them traced, unchecked.

Running means (:func:`track_batch_sharpness`, :func:`track_k`) are exponentially weighted: after n
measurements x_1 … x_n the mean is ``Σ_i d^(n−i) x_i / Σ_i d^(n−i)`` with ``d = decay``, i.e. a
debiased EMA that averages about ``(1 + d)/(1 − d)`` measurements; ``decay=None`` gives every
measurement equal weight (the all-time mean). Standard errors treat the measurements as
independent (true for the batches, not for the drifting parameters): ``sqrt(v · Σw²) / Σw`` with
``v`` the weighted sample variance, debiased as for reliability weights (``ddof=1`` when
``decay=None``); NaN until two measurements exist.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kstep import estimators, losses, noise_kernel

Array = jax.Array
PyTree = Any
ScalarOrSchedule = optax.ScalarOrSchedule

LAMBDA_MAX_METHODS = ("lanczos", "power")
TRACE_ESTIMATORS = ("hutchinson", "exact")


# ----------------------------------------------------------------------------------------------
# Argument checks and helpers.


def _is_number(x: Any) -> bool:
  """True for values known at construction (Python/NumPy numbers, concrete scalar arrays)."""
  if isinstance(x, bool):
    return False
  if isinstance(x, numbers.Number):
    return True
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.ndim == 0


def _is_traced_scalar(x: Any) -> bool:
  """True for a scalar known only inside jit: a hyperparameter that ``optax.inject_hyperparams``
  passes to the factory again at every jitted ``update``. It cannot be checked (``init`` saw the
  concrete value and checked it there)."""
  return isinstance(x, jax.core.Tracer) and jnp.ndim(x) == 0


def _check_positive_int(name: str, value: Any) -> None:
  if _is_traced_scalar(value):
    return
  if isinstance(value, bool) or not _is_number(value) or int(value) != value or value < 1:
    raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


def _check_static_int(name: str, value: Any, what: str) -> int:
  """``value`` as a Python int >= 1; ``what`` says why it must be static (it sets a shape or a
  loop bound), for the error raised when ``optax.inject_hyperparams`` traces it."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"`{name}` {what} and must be a static Python int; under optax.inject_hyperparams list "
        "it in `static_args`."
    )
  _check_positive_int(name, value)
  return int(value)


def _static_or_traced_int(value: Any) -> int | Array:
  """A checked integer argument that may be traced: a Python int when concrete."""
  return value if _is_traced_scalar(value) else int(value)


def _check_positive_float(name: str, value: Any) -> None:
  if _is_traced_scalar(value):
    return
  if not _is_number(value) or not float(value) > 0.0:
    raise ValueError(f"`{name}` must be a number > 0; got {value!r}.")


def _check_callable(name: str, value: Any, signature: str) -> None:
  if not callable(value):
    raise ValueError(f"`{name}` must be callable {signature}; got {value!r}.")


def _check_decay(decay: Any) -> None:
  if decay is None or _is_traced_scalar(decay):
    return
  if not _is_number(decay) or not 0.0 <= float(decay) < 1.0:
    raise ValueError(f"`decay` must be in [0, 1) or None (all-time mean); got {decay!r}.")


def _check_learning_rate(learning_rate: Any, *, optional: bool) -> None:
  if learning_rate is None and optional:
    return
  if callable(learning_rate) or _is_traced_scalar(learning_rate):
    return
  if not _is_number(learning_rate) or not float(learning_rate) > 0.0:
    what = "a number > 0, an optax schedule" + (" or None" if optional else "")
    raise ValueError(f"`learning_rate` must be {what}; got {learning_rate!r}.")


def _check_momentum(momentum: Any) -> None:
  if _is_traced_scalar(momentum):
    return
  if not _is_number(momentum) or not 0.0 <= float(momentum) < 1.0:
    raise ValueError(f"`momentum` must be in [0, 1); got {momentum!r}.")


def _prng_key(seed: int | Array) -> Array:
  """``PRNGKey(seed)`` for an integer seed; a PRNG key (typed, or uint32 of shape (2,)) as is."""
  if isinstance(seed, jax.Array) and (
      jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) or seed.shape == (2,)
  ):
    return seed
  is_int_array = (
      isinstance(seed, jax.Array) and seed.ndim == 0 and jnp.issubdtype(seed.dtype, jnp.integer)
  )
  if isinstance(seed, bool) or not (isinstance(seed, (int, np.integer)) or is_int_array):
    raise ValueError(f"`seed` must be an int or a PRNG key; got {seed!r}.")
  return jax.random.PRNGKey(seed)


def _value(x: ScalarOrSchedule, count: Array) -> Array:
  return jnp.asarray(x(count) if callable(x) else x, jnp.float32)


def _f32(x: Any) -> Array:
  return jnp.asarray(x, jnp.float32)


def _zero() -> Array:
  return jnp.zeros((), jnp.float32)


def _izero() -> Array:
  return jnp.zeros((), jnp.int32)


def _nan() -> Array:
  return jnp.full((), jnp.nan, jnp.float32)


def _same_types(new: Any, old: Any) -> Any:
  """``new`` with the dtypes (and strong typing) of ``old``: both ``lax.cond`` branches agree."""
  return jax.tree.map(lambda n, o: jax.lax.convert_element_type(n, o.dtype), new, old)


def _keep_if(valid: Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(valid, n, o).astype(o.dtype), new, old)


def _accept(valid: Array, new: Any, state: Any, prefix: str) -> Any:
  """``new`` where the measurement is ``valid``, else ``state``; counts it in
  ``{prefix}_num_measurements`` or ``{prefix}_num_skipped``."""
  kept = _keep_if(valid, _same_types(new, state), state)
  measured, skipped = f"{prefix}_num_measurements", f"{prefix}_num_skipped"
  return kept._replace(**{
      measured: getattr(state, measured) + valid.astype(jnp.int32),
      skipped: getattr(state, skipped) + (~valid).astype(jnp.int32),
  })


def _get_batch(extra_args: dict[str, Any], who: str, *, allow_measure_batch: bool = False) -> Any:
  if allow_measure_batch and extra_args.get("measure_batch") is not None:
    return extra_args["measure_batch"]
  batch = extra_args.get("batch")
  if batch is None:
    alt = " (or a fixed `measure_batch=`)" if allow_measure_batch else ""
    raise ValueError(
        f"kstep.{who} measures on the batch the gradients came from: call "
        f"`opt.update(grads, state, params, batch=batch)`{alt}; inside optax.chain the keyword "
        "is forwarded to every member."
    )
  return batch


def _check_params(params: Any, who: str) -> None:
  if params is None:
    raise ValueError(
        f"kstep.{who} needs `params`: opt.update(grads, state, params, batch=batch)."
    )


class _Moments(NamedTuple):
  """Exponentially weighted running moments of a few scalars (see the module docstring).

  ``w1 = Σ w_i``, ``w2 = Σ w_i²`` with ``w_i = d^(n−i)``; ``mean[j]`` the weighted means and
  ``comoment[j, l] = Σ w_i (x_ij − mean_j)(x_il − mean_l)``, updated by West's (weighted
  Welford) recursion, which needs no large cancelling sums.
  """

  w1: Array
  w2: Array
  mean: Array
  comoment: Array


def _moments_init(n: int) -> _Moments:
  return _Moments(
      _zero(), _zero(), jnp.zeros((n,), jnp.float32), jnp.zeros((n, n), jnp.float32)
  )


def _moments_update(m: _Moments, x: Array, decay: float | None) -> _Moments:
  d = jnp.float32(1.0 if decay is None else decay)
  w1 = d * m.w1 + 1.0
  w2 = d * d * m.w2 + 1.0
  mean = m.mean + (x - m.mean) / w1
  comoment = d * m.comoment + jnp.outer(x - m.mean, x - mean)
  comoment = (comoment + comoment.T) / 2
  return _Moments(w1, w2, mean, comoment)


def _stderr_of_mean(m: _Moments, var_sum: Array) -> Array:
  """SE of a weighted mean whose weighted sum of squared deviations is ``var_sum``."""
  # v = S / (Σw − Σw²/Σw) (reliability weights; S/(n − 1) for equal weights) and
  # SE² = v · Σw² / (Σw)² = S · Σw² / (Σw · ((Σw)² − Σw²)).
  denom = m.w1 * m.w1 - m.w2  # 0 for a single measurement
  ok = denom > 1e-6 * m.w1 * m.w1
  se2 = jnp.maximum(var_sum, 0.0) * m.w2 / (m.w1 * jnp.where(ok, denom, 1.0))
  return jnp.where(ok, jnp.sqrt(se2), jnp.nan)


# ----------------------------------------------------------------------------------------------
# λ_max.


class TrackLambdaMaxState(NamedTuple):
  """State of :func:`track_lambda_max`.

  Attributes:
    count: updates seen so far (int32).
    key: PRNG key of the random start vectors (folded with ``count``).
    eigenvector: unit-norm float32 pytree shaped like params, the last top eigenvector (the warm
      start of the next solve).
    lambda_max: the largest algebraic Hessian eigenvalue at the last measurement (0 before any).
    lambda_max_residual: ``‖H v − λ v‖`` of the last measurement.
    lambda_max_iters: Hessian-vector products the last solve spent (the residual check excluded).
    lambda_max_num_measurements: valid measurements so far.
    lambda_max_num_skipped: measurements dropped as NaN/Inf.
  """

  count: Array
  key: Array
  eigenvector: PyTree
  lambda_max: Array
  lambda_max_residual: Array
  lambda_max_iters: Array
  lambda_max_num_measurements: Array
  lambda_max_num_skipped: Array

  STATS_FIELDS = (
      "lambda_max", "lambda_max_residual", "lambda_max_iters", "lambda_max_num_measurements",
      "lambda_max_num_skipped",
  )


def track_lambda_max(
    loss_fn: Callable[[PyTree, Any], Array],
    *,
    every: int,
    num_iters: int = 20,
    method: str = "lanczos",
    warm_start: bool = True,
    tol: float = 1e-3,
    seed: int | Array = 0,
    axis_name: estimators.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Records λ_max, the largest algebraic eigenvalue of the Hessian ``∇²_θ loss_fn(θ, batch)``.

  The sharpness of Cohen et al. (2021): full-batch gradient descent with step η drives λ_max up
  to ``2/η`` (progressive sharpening) and then hovers there (the Edge of Stability); under
  mini-batch SGD λ_max stays below ``2/η`` (Andreyev & Beneventano, EoSS) while Batch Sharpness
  (:func:`track_batch_sharpness`) takes its place. Every ``every`` updates,
  :func:`kstep.lambda_max` solves for the top eigenpair with Lanczos (full reorthogonalisation)
  or shifted power iteration on Hessian-vector products (forward-over-reverse, at a float32 copy
  of params), started from the previous eigenvector when ``warm_start``: after a small
  parameter update it is nearly converged already, and the solve stops early on the residual
  ``‖H v − λ v‖ ≤ tol·|λ|``.

  The batch: the keyword ``measure_batch=`` of ``update`` if given (e.g. a fixed subset of the
  training set, for a full-batch λ_max under SGD), else ``batch=`` (the current batch; the
  λ_max of that mini-batch's Hessian). The batch stays fixed during one solve.

  Cost per measurement: at most ``num_iters + 1`` Hessian-vector products (each about the cost
  of two to three gradients), fewer with a warm start; memory ``num_iters × P`` floats for the
  Lanczos basis plus one float32 copy of params in the state.

  Args:
    loss_fn: scalar loss ``loss_fn(params, batch)``.
    every: measure on updates 0, ``every``, ``2·every``, …
    num_iters: the most Hessian-vector products per solve.
    method: ``"lanczos"`` or ``"power"`` (see :func:`kstep.lambda_max`).
    warm_start: start each solve from the previous eigenvector (else from a fresh random one).
    tol: relative residual at which a solve stops. The eigenvalue's error is of order
      ``residual² / gap``, far below ``tol``.
    seed: int seed (or PRNG key) of the random start vectors.
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split over (λ_max of the
      global batch's loss; one all-reduce of P floats per product). Not needed under ``jax.jit``
      with sharded arrays.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`TrackLambdaMaxState`;
    ``kstep.stats`` reports ``lambda_max``, ``lambda_max_residual``, ``lambda_max_iters``,
    ``lambda_max_num_measurements`` and ``lambda_max_num_skipped``.

  Raises:
    ValueError: at construction, naming the argument that is out of range.
  """
  _check_callable("loss_fn", loss_fn, "loss_fn(params, batch) -> scalar")
  _check_positive_int("every", every)
  num_iters = _check_static_int("num_iters", num_iters, "sets the size of the Lanczos basis")
  if method not in LAMBDA_MAX_METHODS:
    raise ValueError(f"`method` must be one of {LAMBDA_MAX_METHODS}; got {method!r}.")
  if not isinstance(warm_start, bool):
    raise ValueError(f"`warm_start` must be a bool; got {warm_start!r}.")
  _check_positive_float("tol", tol)
  base_key = _prng_key(seed)
  every = _static_or_traced_int(every)

  def init_fn(params: PyTree) -> TrackLambdaMaxState:
    return TrackLambdaMaxState(
        count=_izero(), key=base_key, eigenvector=estimators.random_unit(base_key, params),
        lambda_max=_zero(), lambda_max_residual=_zero(), lambda_max_iters=_izero(),
        lambda_max_num_measurements=_izero(), lambda_max_num_skipped=_izero(),
    )

  def measure(state: TrackLambdaMaxState, params: PyTree, batch: Any) -> TrackLambdaMaxState:
    key = jax.random.fold_in(state.key, state.count)
    start = state.eigenvector if warm_start else None  # None: a random start drawn from `key`
    res = estimators.lambda_max(
        loss_fn, params, batch, num_iters=num_iters, method=method, init=start, key=key, tol=tol,
        axis_name=axis_name,
    )
    finite = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(res.eigenvector)]
    vec_ok = jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)
    valid = jnp.isfinite(res.value) & jnp.isfinite(res.residual) & vec_ok
    new = state._replace(
        eigenvector=_same_types(res.eigenvector, state.eigenvector), lambda_max=res.value,
        lambda_max_residual=res.residual, lambda_max_iters=res.num_iters,
    )
    return _accept(valid, new, state, "lambda_max")

  def update_fn(updates, state: TrackLambdaMaxState, params=None, **extra_args):
    _check_params(params, "track_lambda_max")
    batch = _get_batch(extra_args, "track_lambda_max", allow_measure_batch=True)
    new_state = jax.lax.cond(
        state.count % every == 0, lambda s: measure(s, params, batch), lambda s: s, state
    )
    return updates, new_state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Batch Sharpness.


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
    edge_ratio: ``η · batch_sharpness / 2`` with η the learning rate at this update (1 is the
      edge); NaN when no ``learning_rate`` was given.
    batch_sharpness_num_measurements: valid measurements so far.
    batch_sharpness_num_skipped: measurements dropped as NaN/Inf.
  """

  count: Array
  moments: _Moments
  batch_sharpness: Array
  batch_sharpness_stderr: Array
  batch_sharpness_mean_of_ratios: Array
  batch_sharpness_mean_of_ratios_stderr: Array
  batch_sharpness_last: Array
  edge_ratio: Array
  batch_sharpness_num_measurements: Array
  batch_sharpness_num_skipped: Array

  STATS_FIELDS = (
      "batch_sharpness", "batch_sharpness_stderr", "batch_sharpness_mean_of_ratios",
      "batch_sharpness_mean_of_ratios_stderr", "batch_sharpness_last", "edge_ratio",
      "batch_sharpness_num_measurements", "batch_sharpness_num_skipped",
  )


def track_batch_sharpness(
    loss_fn: Callable[[PyTree, Any], Array],
    *,
    every: int,
    learning_rate: ScalarOrSchedule | None = None,
    decay: float | None = 0.95,
    axis_name: estimators.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Records Batch Sharpness (Andreyev & Beneventano, EoSS, Definition 1) along training.

  ``BatchSharpness = E_B[g_Bᵀ H_B g_B] / E_B[‖g_B‖²]``: the curvature of each mini-batch loss
  ``L_B`` along its own gradient ``g_B = ∇L_B``, with ``H_B = ∇²L_B``, averaged over batches as a
  ratio of expectations. EoSS's claim: under mini-batch SGD with step η, after progressive
  sharpening Batch Sharpness reaches ``2/η`` and hovers there while the full-batch λ_max
  (:func:`track_lambda_max`) stays below ``2/η``, the lower the smaller the batch. ``edge_ratio
  = η · BatchSharpness / 2`` is therefore ≈ 1 at the EoSS.

  Every ``every`` updates the pair ``(g_Bᵀ H_B g_B, ‖g_B‖²)`` is measured on the current batch
  (keyword ``batch=``) at ``params`` with :func:`kstep.estimators.batch_curvature`; the
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
      takes, for ``edge_ratio``); ``None`` leaves ``edge_ratio`` NaN.
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
    ValueError: at construction, naming the argument that is out of range.
  """
  _check_callable("loss_fn", loss_fn, "loss_fn(params, batch) -> scalar")
  _check_positive_int("every", every)
  _check_learning_rate(learning_rate, optional=True)
  _check_decay(decay)
  every = _static_or_traced_int(every)

  def init_fn(params: PyTree) -> TrackBatchSharpnessState:
    del params
    return TrackBatchSharpnessState(
        count=_izero(), moments=_moments_init(3), batch_sharpness=_zero(),
        batch_sharpness_stderr=_nan(), batch_sharpness_mean_of_ratios=_zero(),
        batch_sharpness_mean_of_ratios_stderr=_nan(), batch_sharpness_last=_zero(),
        edge_ratio=_nan(), batch_sharpness_num_measurements=_izero(),
        batch_sharpness_num_skipped=_izero(),
    )

  def measure(state: TrackBatchSharpnessState, params: PyTree, batch: Any):
    num, den = estimators.batch_curvature(loss_fn, params, batch, axis_name=axis_name)
    num, den = _f32(num), _f32(den)
    valid = jnp.isfinite(num) & jnp.isfinite(den) & (den >= 0)
    ratio = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    m = _moments_update(state.moments, jnp.stack([num, den, ratio]), decay)
    mn, md, mr = m.mean[0], m.mean[1], m.mean[2]
    bs = jnp.where(md > 0, mn / jnp.where(md > 0, md, 1.0), 0.0)
    c = m.comoment
    resid = c[0, 0] - 2.0 * bs * c[0, 1] + bs * bs * c[1, 1]  # Σ w (num − bs·den)²
    bs_se = jnp.where(md > 0, _stderr_of_mean(m, resid) / jnp.where(md > 0, md, 1.0), 0.0)
    new = state._replace(
        moments=m, batch_sharpness=bs, batch_sharpness_stderr=bs_se,
        batch_sharpness_mean_of_ratios=mr,
        batch_sharpness_mean_of_ratios_stderr=_stderr_of_mean(m, c[2, 2]),
        batch_sharpness_last=ratio,
    )
    return _accept(valid, new, state, "batch_sharpness")

  def update_fn(updates, state: TrackBatchSharpnessState, params=None, **extra_args):
    _check_params(params, "track_batch_sharpness")
    batch = _get_batch(extra_args, "track_batch_sharpness")
    new_state = jax.lax.cond(
        state.count % every == 0, lambda s: measure(s, params, batch), lambda s: s, state
    )
    if learning_rate is None:
      edge = _nan()
    else:
      edge = _value(learning_rate, state.count) * new_state.batch_sharpness / 2.0
      edge = jnp.where(new_state.batch_sharpness_num_measurements > 0, edge, jnp.nan)
    return updates, new_state._replace(
        count=optax.safe_increment(state.count), edge_ratio=edge.astype(jnp.float32)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# K.


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
  moments: _Moments
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
    axis_name: estimators.AxisName = None,
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
  _check_callable("apply_fn", apply_fn, "apply_fn(params, batch) -> outputs")
  losses.resolve_loss(loss)
  _check_positive_int("batch_size", batch_size)
  _check_learning_rate(learning_rate, optional=False)
  _check_momentum(momentum)
  _check_positive_int("every", every)
  num_probes = _check_static_int("num_probes", num_probes, "sets the number of probes (a shape)")
  if estimator not in TRACE_ESTIMATORS:
    raise ValueError(f"`estimator` must be one of {TRACE_ESTIMATORS}; got {estimator!r}.")
  estimators.check_probe_scope(probe_scope, axis_name)
  _check_decay(decay)
  base_key = _prng_key(seed)
  every = _static_or_traced_int(every)

  def init_fn(params: PyTree) -> TrackKState:
    del params
    return TrackKState(
        count=_izero(), key=base_key, moments=_moments_init(1), k=_zero(), k_trace=_zero(),
        k_trace_stderr=_nan(), k_trace_raw=_zero(), k_learning_rate=_zero(),
        k_num_measurements=_izero(), k_num_skipped=_izero(),
    )

  def measure(state: TrackKState, params: PyTree, batch: Any) -> TrackKState:
    key = jax.random.fold_in(state.key, state.count)
    raw = estimators.gauss_newton_trace(
        apply_fn, params, batch, loss=loss, key=key, num_probes=num_probes, method=estimator,
        axis_name=axis_name, probe_scope=probe_scope,
    ).value
    raw = _f32(raw)
    valid = jnp.isfinite(raw) & (raw > 0)
    m = _moments_update(state.moments, raw[None], decay)
    new = state._replace(
        moments=m, k_trace=m.mean[0], k_trace_stderr=_stderr_of_mean(m, m.comoment[0, 0]),
        k_trace_raw=raw,
    )
    return _accept(valid, new, state, "k")

  def update_fn(updates, state: TrackKState, params=None, **extra_args):
    _check_params(params, "track_k")
    batch = _get_batch(extra_args, "track_k")
    new_state = jax.lax.cond(
        state.count % every == 0, lambda s: measure(s, params, batch), lambda s: s, state
    )
    eta = _value(learning_rate, state.count)
    k = noise_kernel.k_from_trace(eta, batch_size, new_state.k_trace, momentum)
    return updates, new_state._replace(
        count=optax.safe_increment(state.count), k=_f32(k), k_learning_rate=eta
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
