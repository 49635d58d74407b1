"""What the three trackers share: constants, the keep-if-valid rule, batch lookup, running moments.

A measurement that comes out NaN or ±Inf is dropped (:func:`accept`): the reported values keep
their previous values (NaN before the first valid measurement) and ``<prefix>_num_skipped``
counts it. Running means are exponentially
weighted (:class:`Moments`, West's weighted Welford recursion); see :mod:`kstep._src.diagnostics`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep._src import arguments, preconditioners

Array = jax.Array


def f32(x: Any) -> Array:
  return jnp.asarray(x, jnp.float32)


def zero() -> Array:
  return jnp.zeros((), jnp.float32)


def izero() -> Array:
  return jnp.zeros((), jnp.int32)


def nan() -> Array:
  return jnp.full((), jnp.nan, jnp.float32)


def edge_ratio(learning_rate: Any, count: Array, value: Array, edge: Any) -> Array:
  """``η · value / edge`` with η the learning rate (float or optax schedule) at update ``count``
  and ``edge`` the threshold's numerator (e.g. ``2(1 + μ)``): 1 on the edge. NaN without a
  learning rate, and while ``value`` is NaN (before its first valid measurement)."""
  if learning_rate is None:
    return nan()
  return f32(arguments.schedule_value(learning_rate, count) * value / edge)


def same_types(new: Any, old: Any) -> Any:
  """``new`` with the dtypes (and strong typing) of ``old``: both ``lax.cond`` branches agree."""
  return jax.tree.map(lambda n, o: jax.lax.convert_element_type(n, o.dtype), new, old)


def keep_if(valid: Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(valid, n, o).astype(o.dtype), new, old)


def accept(valid: Array, new: Any, state: Any, prefix: str) -> Any:
  """``new`` where the measurement is ``valid``, else ``state``; counts it in
  ``{prefix}_num_measurements`` or ``{prefix}_num_skipped``."""
  kept = keep_if(valid, same_types(new, state), state)
  measured, skipped = f"{prefix}_num_measurements", f"{prefix}_num_skipped"
  return kept._replace(**{
      measured: getattr(state, measured) + valid.astype(jnp.int32),
      skipped: getattr(state, skipped) + (~valid).astype(jnp.int32),
  })


def get_batch(extra_args: dict[str, Any], who: str, *, allow_measure_batch: bool = False) -> Any:
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


def check_params(params: Any, who: str) -> None:
  if params is None:
    raise ValueError(
        f"kstep.{who} needs `params`: opt.update(grads, state, params, batch=batch)."
    )


class Moments(NamedTuple):
  """Exponentially weighted running moments of a few scalars (see the module docstring).

  ``w1 = Σ w_i``, ``w2 = Σ w_i²`` with ``w_i = d^(n−i)``; ``mean[j]`` the weighted means and
  ``comoment[j, l] = Σ w_i (x_ij − mean_j)(x_il − mean_l)``, updated by West's (weighted
  Welford) recursion, which needs no large cancelling sums.
  """

  w1: Array
  w2: Array
  mean: Array
  comoment: Array


def moments_init(n: int) -> Moments:
  return Moments(
      zero(), zero(), jnp.zeros((n,), jnp.float32), jnp.zeros((n, n), jnp.float32)
  )


def moments_update(m: Moments, x: Array, decay: float | None) -> Moments:
  d = jnp.float32(1.0 if decay is None else decay)
  w1 = d * m.w1 + 1.0
  w2 = d * d * m.w2 + 1.0
  mean = m.mean + (x - m.mean) / w1
  comoment = d * m.comoment + jnp.outer(x - m.mean, x - mean)
  comoment = (comoment + comoment.T) / 2
  return Moments(w1, w2, mean, comoment)


def stderr_of_mean(m: Moments, var_sum: Array) -> Array:
  """SE of a weighted mean whose weighted sum of squared deviations is ``var_sum``."""
  # v = S / (Σw − Σw²/Σw) (reliability weights; S/(n − 1) for equal weights) and
  # SE² = v · Σw² / (Σw)² = S · Σw² / (Σw · ((Σw)² − Σw²)).
  denom = m.w1 * m.w1 - m.w2  # 0 for a single measurement
  ok = denom > 1e-6 * m.w1 * m.w1
  se2 = jnp.maximum(var_sum, 0.0) * m.w2 / (m.w1 * jnp.where(ok, denom, 1.0))
  return jnp.where(ok, jnp.sqrt(se2), jnp.nan)


class PreconditionedTrackerState(NamedTuple):
  """State of a tracker given a ``preconditioner``: the preconditioner transform's own state
  (Adam's ``mu``, ``nu``, …) and the tracker's."""

  preconditioner: Any
  tracker: Any


def with_preconditioner(preconditioner: Any, init_fn, update_fn):
  """An optax transformation from a tracker's ``init_fn`` and ``update_fn(updates, state,
  params, extra_args, inv_sqrt)``.

  Without a ``preconditioner`` (None) it passes the updates through and ``inv_sqrt`` is None.
  With one it runs the preconditioner's transform first (it *is* that link of the chain, e.g.
  in place of ``optax.scale_by_adam``; :func:`kstep._src.preconditioners.wrap`), with state
  :class:`PreconditionedTrackerState`.
  """
  if preconditioner is None:
    return optax.GradientTransformationExtraArgs(
        init_fn, lambda u, s, params=None, **extra: update_fn(u, s, params, extra, None))
  return preconditioners.wrap(preconditioner, init_fn, update_fn, PreconditionedTrackerState)


def momentum_and_ema(preconditioner: Any, momentum: Any) -> tuple[Any, bool]:
  """The momentum the edges use: the preconditioner's where it has one (then ``momentum``
  must be 0), else ``momentum``; and whether it is an EMA.

  Raises:
    ValueError: ``preconditioner`` is neither None nor a :class:`kstep.Preconditioner`; both
      momenta are nonzero.
  """
  preconditioners.check(preconditioner, optional=True)
  if preconditioner is None or float(preconditioner.momentum) == 0.0:
    return momentum, False
  if not (arguments.is_number(momentum) and float(momentum) == 0.0):
    raise ValueError(f"`momentum` must be 0 when the preconditioner has its own momentum "
                     f"({preconditioner.momentum}); got {momentum!r}.")
  return preconditioner.momentum, preconditioner.ema
