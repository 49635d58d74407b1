"""Diagonal preconditioners the K controller and the diagnostics follow (Adam's, RMSprop's).

A :class:`Preconditioner` is an optax transformation that scales gradients by ``P⁻¹`` (with any
momentum it applies) and a function that reads P's diagonal from that transformation's own
state, so that the kernel ``J P⁻¹ Jᵀ`` is measured with the P of the step being taken and without
a second P-sized buffer (``docs/design.md``, "Adaptive optimizers").
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kstep._src import arguments

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Preconditioner:
  """A diagonal preconditioner for :func:`scale_by_preconditioned_k_control`.

  Attributes:
    transform: the optax transformation that turns gradients into ``P⁻¹``-scaled updates (with
      its momentum, if any), e.g. ``optax.scale_by_adam(...)``; it may end in a chain with
      decoupled weight decay.
    diagonal: ``diagonal(state) -> P``: P's diagonal (params-shaped, positive) from
      ``transform``'s state after its update.
    momentum: μ of the momentum inside ``transform``, in [0, 1) (0.0: none).
    ema: whether that momentum is an EMA, ``m ← μ m + (1 − μ) g`` (Adam's), rather than heavy
      ball ``m ← μ m + g`` (``optax.trace``).

  Example:
    >>> import kstep
    >>> kstep.adam_preconditioner(b1=0.9).momentum
    0.9
  """

  transform: optax.GradientTransformation
  diagonal: Callable[[Any], PyTree]
  momentum: float = 0.0
  ema: bool = False

  def __post_init__(self):
    if not isinstance(self.transform, optax.GradientTransformation):
      raise ValueError("`Preconditioner.transform` must be an optax.GradientTransformation; got "
                       f"{self.transform!r}.")
    arguments.check_callable("Preconditioner.diagonal", self.diagonal, "diagonal(state) -> P")
    _check_unit("Preconditioner.momentum", self.momentum)
    if not isinstance(self.ema, bool):
      raise ValueError(f"`Preconditioner.ema` must be a bool; got {self.ema!r}.")


def adam_preconditioner(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        eps_root: float = 0.0) -> Preconditioner:
  r"""Adam's preconditioner: ``optax.scale_by_adam`` and its ``P = \sqrt{\hat v + ε_{root}} + ε``.

  Args:
    b1: β₁ in [0, 1), the EMA of gradients (the controller's momentum, an EMA).
    b2: β₂ in [0, 1), the EMA of squared gradients behind ``v̂`` (bias-corrected).
    eps: ε ≥ 0 added to ``√v̂``.
    eps_root: ε_root ≥ 0 added to ``v̂`` inside the root.

  Returns:
    A :class:`kstep.Preconditioner` with ``momentum=b1, ema=True``.

  Example:
    >>> import kstep
    >>> kstep.adam_preconditioner().ema
    True
  """
  _check_unit("b1", b1)
  _check_unit("b2", b2)
  _check_nonnegative("eps", eps)
  _check_nonnegative("eps_root", eps_root)

  def diagonal(state: optax.ScaleByAdamState) -> PyTree:
    nu_hat = optax.tree.bias_correction(state.nu, b2, state.count)
    return jax.tree.map(lambda v: jnp.sqrt(v.astype(jnp.float32) + eps_root) + eps, nu_hat)

  return Preconditioner(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root), diagonal,
                        momentum=b1, ema=True)


def rms_preconditioner(decay: float = 0.9, eps: float = 1e-8, *,
                       bias_correction: bool = False) -> Preconditioner:
  r"""RMSprop's preconditioner: ``optax.scale_by_rms`` (ε outside the root) and
  ``P = \sqrt{\hat v} + ε``; no momentum (put the controller's own momentum in a chain before).

  Args:
    decay: the EMA coefficient of squared gradients, in [0, 1).
    eps: ε ≥ 0 added to ``√v̂``.
    bias_correction: whether ``v̂`` is bias-corrected (as optax's ``bias_correction``).

  Returns:
    A :class:`kstep.Preconditioner` without momentum.

  Example:
    >>> import kstep
    >>> kstep.rms_preconditioner(0.99).momentum
    0.0
  """
  _check_unit("decay", decay)
  _check_nonnegative("eps", eps)
  if not isinstance(bias_correction, bool):
    raise ValueError(f"`bias_correction` must be a bool; got {bias_correction!r}.")

  def diagonal(state: Any) -> PyTree:
    nu = state.nu
    if bias_correction:
      nu = optax.tree.bias_correction(nu, decay, state.count)
    return jax.tree.map(lambda v: jnp.sqrt(v.astype(jnp.float32)) + eps, nu)

  transform = optax.scale_by_rms(decay=decay, eps=eps, eps_in_sqrt=False,
                                 bias_correction=bias_correction)
  return Preconditioner(transform, diagonal)


def _check_unit(name: str, value: Any) -> None:
  if arguments.is_traced_scalar(value):  # injected (checked at init)
    return
  if not (arguments.is_number(value) and 0.0 <= float(value) < 1.0):
    raise ValueError(f"`{name}` must be a number in [0, 1); got {value!r}.")


def _check_nonnegative(name: str, value: Any) -> None:
  if arguments.is_traced_scalar(value):
    return
  if not (arguments.is_number(value) and float(value) >= 0.0):
    raise ValueError(f"`{name}` must be a number >= 0; got {value!r}.")


# In the estimate P is floored per leaf at this fraction of the leaf's mean (docs/design.md,
# "Adaptive optimizers": where v̂ is far below a coordinate's own gradient scale, Adam's P adapts
# within a step and the frozen-P kernel would count 1/ε).
DIAGONAL_FLOOR = 0.1


def inverse_sqrt(diagonal: PyTree, floor: float = DIAGONAL_FLOOR) -> PyTree:
  """``P^{-1/2}`` in float32 with each leaf of P floored at ``floor`` times its mean (and at
  float32's smallest normal number, so a zero P gives a large finite weight, not inf·0 = NaN)."""
  tiny = jnp.finfo(jnp.float32).tiny

  def one(p: Array) -> Array:
    p = p.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.maximum(p, jnp.maximum(floor * jnp.mean(p), tiny)))

  return jax.tree.map(one, diagonal)


def check(preconditioner: Any, optional: bool) -> None:
  """Raises ``ValueError`` unless ``preconditioner`` is a :class:`Preconditioner` (or None where
  ``optional``)."""
  if preconditioner is None and optional:
    return
  if not isinstance(preconditioner, Preconditioner):
    none = " or None" if optional else ""
    raise ValueError("`preconditioner` must be a kstep.Preconditioner (e.g. "
                     f"kstep.adam_preconditioner()){none}; got {preconditioner!r}.")


def wrap(preconditioner: Preconditioner, init_fn: Callable[[PyTree], Any],
         update_fn: Callable[..., tuple[PyTree, Any]],
         state_cls: type) -> optax.GradientTransformationExtraArgs:
  """``preconditioner``'s transform followed by a measuring link, as one optax transformation.

  ``update_fn(updates, state, params, extra_args, inv_sqrt)`` gets the preconditioned updates
  and ``inv_sqrt``, a function returning ``P^{-1/2}`` (:func:`inverse_sqrt`) read from the
  transform's state after its update, to be called only inside a measurement. The state is
  ``state_cls(<the transform's state>, <init_fn's state>)``, a NamedTuple of those two fields in
  that order (the controller's and the trackers').
  """
  inner = optax.with_extra_args_support(preconditioner.transform)

  def init(params: PyTree) -> Any:
    return state_cls(inner.init(params), init_fn(params))

  def update(updates, state, params=None, **extra_args):
    updates, inner_state = inner.update(updates, state[0], params, **extra_args)
    inv_sqrt = lambda: inverse_sqrt(preconditioner.diagonal(inner_state))
    updates, own = update_fn(updates, state[1], params, extra_args, inv_sqrt)
    return updates, state_cls(inner_state, own)

  return optax.GradientTransformationExtraArgs(init, update)
