"""The K controller's grouped options (:class:`Estimate`, :class:`Guard`) and its defaults.

Each default is one constant here; the measurements that chose it are recorded in
``docs/defaults.md``. :func:`curvature_edge` is the edge the guard keeps below
(``docs/design.md``, "Two edges").
"""

import dataclasses
from typing import Any

import jax

from kstep._src import arguments, estimators, k_estimate
from kstep._src.noise_kernel import curvature_edge  # noqa: F401  (the controller's edge)

Array = jax.Array

# K bands per output norm (docs/defaults.md, "Target bands").
DEFAULT_TARGETS = {"per_output": (0.25, 0.4), "max_output": (0.25, 0.4), "total": (0.4, 0.8)}
CROSS_ENTROPY_TARGET = (0.7, 0.8)
# K_P bands of the adaptive controller (docs/defaults.md, "Adam's bands"); "total" for MSE is the
# per-output band scaled as SGD's are (not swept).
ADAPTIVE_TARGETS = {"per_output": (0.55, 1.1), "max_output": (0.55, 1.1), "total": (0.9, 1.8)}
ADAPTIVE_CROSS_ENTROPY_TARGET = (1.6, 6.4)
# The adaptive controller's guard ratio, every loss (docs/defaults.md, "Adam's guard ratio").
ADAPTIVE_MAX_SHARPNESS_RATIO = 0.25
# The trace floor ρ and the guard ratio r: "auto" resolves per loss.
CROSS_ENTROPY_TRACE_FLOOR = 0.03
DEFAULT_MAX_SHARPNESS_RATIO = 0.5
CROSS_ENTROPY_MAX_SHARPNESS_RATIO = 0.25
# The first estimate sets S̄ alone: the whole batch, FIRST_PROBES times the probes and
# FIRST_POWER_ITERS power steps.
FIRST_POWER_ITERS = 20
FIRST_PROBES = 8
# Between refreshes the guard's power steps run only while the last step's η·λ̄ is above this
# fraction of its cap.
SHARPNESS_NEAR = 0.5
DEFAULT_EVERY = 10
DEFAULT_REFRESH_EVERY = 8
DEFAULT_PROBE_BATCH_SIZE = k_estimate.DEFAULT_PROBE_BATCH_SIZE
DEFAULT_POWER_ITERS = k_estimate.DEFAULT_SHARPNESS_ITERS


@dataclasses.dataclass(frozen=True)
class Estimate:
  """How the K controller measures the kernel scale S (see :func:`kstep.k_controlled_sgd`).

  Attributes:
    every: estimate at every ``every``-th update, the first at update 0 (int ≥ 1).
    num_probes: Hutchinson probes per estimate (int ≥ 1; 8× as many at the first estimate).
    probe_batch_size: estimate on every ``B // probe_batch_size``-th example (int ≥ 1);
      ``None``: the whole batch. The first estimate always uses the whole batch.
    estimator: ``"hutchinson"`` (probes) or ``"exact"`` (per-example Jacobians; small models).
    output_norm: which K the band is in: ``"per_output"`` (T/C), ``"max_output"`` (λ_max of the
      C×C output kernel), ``"total"`` (T); ``"auto"``: per output for MSE and callables, total
      for the named cross-entropies (``docs/design.md``, "Several outputs per example").
    smoothing: d in [0, 1), the weight of the old S̄ in each new estimate (an EMA).
    max_change: a factor > 1: a raw estimate is clipped to within it of S̄ before smoothing.
    seed: int seed or PRNG key of the probes (the key is made in ``init``).
    probe_scope: with ``axis_name``, ``"global"`` (one probe across shards) or ``"per_shard"``.

  Example:
    >>> import kstep
    >>> kstep.Estimate(every=5, probe_batch_size=None).every
    5
  """

  every: int = DEFAULT_EVERY
  num_probes: int = 1
  probe_batch_size: int | None = DEFAULT_PROBE_BATCH_SIZE
  estimator: str = "hutchinson"
  output_norm: str = "auto"
  smoothing: float = 0.8
  max_change: float = 4.0
  seed: int | Array = 0
  probe_scope: str = "global"

  def __post_init__(self):
    arguments.check_static_int("Estimate.every", self.every, "sets when estimates run")
    arguments.check_static_int("Estimate.num_probes", self.num_probes,
                               "sets the number of probes (a shape)")
    if self.probe_batch_size is not None:
      arguments.check_static_int("Estimate.probe_batch_size", self.probe_batch_size,
                                 "sets the sub-batch's stride (a shape)")
    if self.estimator not in estimators.METHODS:
      raise ValueError(f"`Estimate.estimator` must be one of {estimators.METHODS}; got "
                       f"{self.estimator!r}.")
    if self.output_norm not in k_estimate.OUTPUT_NORMS:
      raise ValueError(f"`Estimate.output_norm` must be one of {k_estimate.OUTPUT_NORMS}; got "
                       f"{self.output_norm!r}.")
    if not arguments.is_traced_scalar(self.smoothing) and not (
        arguments.is_number(self.smoothing) and 0.0 <= float(self.smoothing) < 1.0):
      raise ValueError(f"`Estimate.smoothing` must be in [0, 1); got {self.smoothing!r}.")
    if not arguments.is_traced_scalar(self.max_change) and not (
        arguments.is_number(self.max_change) and float(self.max_change) > 1.0):
      raise ValueError(f"`Estimate.max_change` must be > 1; got {self.max_change!r}.")
    arguments.check_seed(self.seed, "Estimate.seed")
    if self.probe_scope not in estimators.PROBE_SCOPES:
      raise ValueError(f"`Estimate.probe_scope` must be one of {estimators.PROBE_SCOPES}; got "
                       f"{self.probe_scope!r}.")


@dataclasses.dataclass(frozen=True)
class Guard:
  """The K controller's curvature guard: keeps ``η·λ_max ≤ r·E(μ)`` (see
  :func:`kstep.k_controlled_sgd`; ``guard=None`` there turns it off).

  Attributes:
    ratio: r in (0, 1]; ``"auto"``: 0.5 for MSE and callables, 0.25 for the named
      cross-entropies.
    power_iters: warm-started power steps on the Gauss–Newton matrix per estimate (int ≥ 1; 20
      at the first), then λ is read as the Rayleigh quotient of the last vector.
    refresh_every: the power steps (and the trace floor's NTK probe) run at every
      ``refresh_every``-th estimate, and at every estimate while the step is within 2× of its
      cap (int ≥ 1).

  Example:
    >>> import kstep
    >>> kstep.Guard(ratio=0.5).refresh_every
    8
  """

  ratio: float | str = "auto"
  power_iters: int = DEFAULT_POWER_ITERS
  refresh_every: int = DEFAULT_REFRESH_EVERY

  def __post_init__(self):
    if isinstance(self.ratio, str):
      if self.ratio != "auto":
        raise ValueError(f'`Guard.ratio` must be a number in (0.0, 1.0] or "auto"; got '
                         f'{self.ratio!r}.')
    elif self.ratio is None:
      raise ValueError("`Guard.ratio` must be a number in (0.0, 1.0] or \"auto\"; to turn the "
                       "guard off pass `guard=None` to the optimizer.")
    else:
      arguments.check_optional("Guard.ratio", self.ratio, 0.0, 1.0)
    arguments.check_static_int("Guard.power_iters", self.power_iters,
                               "sets the number of power steps (a loop bound)")
    arguments.check_static_int("Guard.refresh_every", self.refresh_every,
                               "sets when the power steps run")


def guard_or_default(guard: Guard | None) -> Guard:
  """``guard``, or the default :class:`Guard` whose ``power_iters`` and ``refresh_every`` a
  controller without a guard still uses (the fused probe's configuration, the trace floor's
  refresh)."""
  return Guard() if guard is None else guard


def check_group(name: str, value: Any, cls: type, optional: bool) -> None:
  """Raises ``ValueError`` unless ``value`` is a ``cls`` (or None where ``optional``)."""
  if value is None and optional:
    return
  if not isinstance(value, cls):
    none = " or None" if optional else ""
    raise ValueError(f"`{name}` must be a kstep.{cls.__name__}(...){none}; got {value!r}.")


def _named_cross_entropy(loss: Any) -> bool:
  return isinstance(loss, str) and loss.endswith("cross_entropy")


def default_target(loss: Any, output_norm: str, adaptive: bool = False) -> tuple[float, float]:
  """The band ``target=None`` means for ``loss`` in the resolved ``output_norm``; ``adaptive``:
  for K_P after a preconditioner (:func:`kstep.k_controlled_adam`)."""
  if _named_cross_entropy(loss) and output_norm == "total":
    return ADAPTIVE_CROSS_ENTROPY_TARGET if adaptive else CROSS_ENTROPY_TARGET
  return (ADAPTIVE_TARGETS if adaptive else DEFAULT_TARGETS)[output_norm]


def resolve_guard_ratio(guard: Guard | None, loss: Any, adaptive: bool = False) -> Any:
  """r for ``guard`` and ``loss`` (``"auto"`` resolved; ``adaptive``: the adaptive controller's,
  0.25 for every loss); None without a guard."""
  if guard is None:
    return None
  if isinstance(guard.ratio, str):
    if adaptive:
      return ADAPTIVE_MAX_SHARPNESS_RATIO
    named_ce = _named_cross_entropy(loss)
    return CROSS_ENTROPY_MAX_SHARPNESS_RATIO if named_ce else DEFAULT_MAX_SHARPNESS_RATIO
  return guard.ratio


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
