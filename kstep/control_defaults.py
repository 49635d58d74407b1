"""The K controller's defaults, measured per loss, and how its ``"auto"`` arguments resolve.

:func:`kstep.scale_by_k_control` documents the measurements behind each value (band sweeps and
parity rows of the benchmarks README); :func:`curvature_edge` is the edge its guard keeps below.
"""

from typing import Any

import jax
import jax.numpy as jnp

from kstep import arguments, k_estimate

Array = jax.Array

DEFAULT_TARGETS = {"per_output": (0.25, 0.4), "max_output": (0.25, 0.4), "total": (0.4, 0.8)}
# The named cross-entropies on their Gauss–Newton trace ("total"): band and guard ratio measured
# on the parity rows (scale_by_k_control's docstring).
CROSS_ENTROPY_TARGET = (0.7, 0.8)
CROSS_ENTROPY_TRACE_FLOOR = 0.03
DEFAULT_MAX_SHARPNESS_RATIO = 0.5
CROSS_ENTROPY_MAX_SHARPNESS_RATIO = 0.25
FIRST_POWER_ITERS = 20
FIRST_PROBES = 8
# Between refreshes (scale_by_k_control's `refresh_every`) the guard's power steps run only
# while the last step's η·λ̄ is above this fraction of its cap.
SHARPNESS_NEAR = 0.5
DEFAULT_REFRESH_EVERY = 8
# Probe rows and warm power steps per estimate (kept in k_estimate, which kstep.value_and_grad
# shares): one step, then the Rayleigh quotient by a JVP (scale_by_k_control's docstring).
DEFAULT_PROBE_BATCH_SIZE = k_estimate.DEFAULT_PROBE_BATCH_SIZE
DEFAULT_SHARPNESS_ITERS = k_estimate.DEFAULT_SHARPNESS_ITERS


def curvature_edge(momentum: Any, nesterov: bool = False) -> Array:
  """E(μ): the largest stable ``η λ`` on a quadratic (module docstring)."""
  mu = jnp.asarray(momentum, jnp.float32)
  return 2.0 * (1.0 + mu) / (1.0 + 2.0 * mu) if nesterov else 2.0 * (1.0 + mu)


def _named_cross_entropy(loss: Any) -> bool:
  return isinstance(loss, str) and loss.endswith("cross_entropy")


def default_target(loss: Any, output_norm: str) -> tuple[float, float]:
  """The band ``target=None`` means for ``loss`` in the resolved ``output_norm``."""
  if _named_cross_entropy(loss) and output_norm == "total":
    return CROSS_ENTROPY_TARGET
  return DEFAULT_TARGETS[output_norm]


def resolve_max_sharpness_ratio(ratio: Any, loss: Any) -> Any:
  """``"auto"``: ``CROSS_ENTROPY_MAX_SHARPNESS_RATIO`` for the named cross-entropies, else
  ``DEFAULT_MAX_SHARPNESS_RATIO``; anything else is checked and returned."""
  if isinstance(ratio, str) and ratio == "auto":
    named_ce = _named_cross_entropy(loss)
    return CROSS_ENTROPY_MAX_SHARPNESS_RATIO if named_ce else DEFAULT_MAX_SHARPNESS_RATIO
  if isinstance(ratio, str):
    raise ValueError(f'`max_sharpness_ratio` must be a number in (0.0, 1.0], "auto" or None; '
                     f'got {ratio!r}.')
  arguments.check_optional("max_sharpness_ratio", ratio, 0.0, 1.0)
  return ratio


def resolve_trace_floor(trace_floor: Any, loss: Any) -> Any:
  """``"auto"``: ``CROSS_ENTROPY_TRACE_FLOOR`` for the named cross-entropies, else None;
  anything else is checked (a number ≥ 0, a traced scalar or None) and returned."""
  if isinstance(trace_floor, str) and trace_floor == "auto":
    return CROSS_ENTROPY_TRACE_FLOOR if _named_cross_entropy(loss) else None
  if trace_floor is None or arguments.is_traced_scalar(trace_floor):
    return trace_floor
  if not arguments.is_number(trace_floor) or float(trace_floor) < 0:
    raise ValueError(f'`trace_floor` must be a number >= 0, "auto" or None; got {trace_floor!r}.')
  return trace_floor
