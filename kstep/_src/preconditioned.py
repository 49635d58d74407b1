"""K control for adaptive optimizers: the controller after a diagonal preconditioner.

Adam's update ``θ ← θ − η P⁻¹ m̂`` is, in the coordinates ``φ = P^{1/2} θ`` and over the steps in
which P changes slowly, momentum SGD on a model with Jacobian ``J P^{-1/2}``: its noise kernel is
``J P⁻¹ Jᵀ`` and its curvature ``P^{-1/2} G P^{-1/2}`` (``docs/design.md``, "Adaptive
optimizers"). :func:`scale_by_preconditioned_k_control` runs a preconditioner's transform
(``optax.scale_by_adam``, ``optax.scale_by_rms``, …), reads P from that transform's own state
after its update (no second P-sized buffer) and hands the preconditioned updates to the K
controller, which estimates K and λ_max of the preconditioned model. :func:`k_controlled_adam` is
the AdamW form users call.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import optax

from kstep._src import arguments, control, preconditioners
from kstep._src.control_state import ScaleByKControlState
from kstep._src.estimators.data_axis import AxisName
from kstep._src.options import Estimate, Guard
from kstep._src.preconditioners import Preconditioner, adam_preconditioner

Array = jax.Array
PyTree = Any


class PreconditionedKControlState(NamedTuple):
  """State of :func:`scale_by_preconditioned_k_control`.

  Attributes:
    preconditioner: the preconditioner transform's own state (Adam's ``mu``, ``nu``, …).
    control: the K controller's :class:`kstep.ScaleByKControlState`.
  """

  preconditioner: Any
  control: ScaleByKControlState


def scale_by_preconditioned_k_control(
    preconditioner: Preconditioner,
    learning_rate: optax.ScalarOrSchedule,
    *,
    apply_fn: Callable[[Any, Any], Array],
    loss: str | Callable[..., Array] = "mse",
    target: tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule] | None = None,
    decay_steps: int | optax.Schedule | None = None,
    batch_size: int | None = None,
    max_scale: float | None = None,
    trace_floor: float | str | None = "auto",
    estimate: Estimate = Estimate(),
    guard: Guard | None = Guard(),
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""A diagonal preconditioner followed by the K controller of its preconditioned kernel.

  With ``P`` the preconditioner's diagonal at the step being taken and μ its momentum, K and the
  curvature edge are those of momentum SGD in the coordinates ``φ = P^{1/2} θ``
  (``docs/design.md``, "Adaptive optimizers"):

  .. math::
    K_P = \frac{\eta\, S_P}{2 \alpha B}, \qquad \eta\,\lambda_{max}(P^{-1} G) < E_P,

  S_P the per-example trace of ``H J P⁻¹ Jᵀ`` (per output for MSE), α = 1 for an EMA momentum
  (Adam: ``E_P = 2(1 + β₁)/(1 − β₁)``) and α = 1 − μ, ``E_P = 2(1 + μ)`` for heavy ball. The
  step is chosen as by :func:`kstep.k_controlled_sgd`; estimates cost what they cost there, one
  elementwise product by ``P^{-1/2}`` more per JVP and VJP.

  Args:
    preconditioner: a :class:`kstep.Preconditioner` (:func:`kstep.adam_preconditioner`,
      :func:`kstep.rms_preconditioner` or your own).
    learning_rate: the base LR η_base > 0 (float or schedule) the controller moves into the band.
    apply_fn: ``apply_fn(params, batch) -> outputs`` ``(B, ...)``, the model on the batch.
    loss: as for :func:`kstep.k_controlled_sgd`.
    target: the K_P band ``(lo, hi)``; ``None``: the loss's default for adaptive optimizers
      (as :func:`kstep.k_controlled_adam`).
    decay_steps: the band's annealing, as for :func:`kstep.k_controlled_sgd`.
    batch_size: B; ``None`` reads it from the outputs.
    max_scale: if given (> 0), the step never exceeds ``max_scale · η_base``.
    trace_floor: ρ ≥ 0, ``"auto"`` or ``None``, on the preconditioned traces.
    estimate: a :class:`kstep.Estimate` (the fused ``probe=`` is not supported here).
    guard: a :class:`kstep.Guard` on ``η·λ_max(P⁻¹G) ≤ r·E_P`` (``"auto"``: r = 0.25), or
      ``None``.
    axis_name: the batch's axis inside ``shard_map``/``pmap``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`kstep.PreconditionedKControlState`; ``update(grads, state, params, batch=batch)``.

  Raises:
    ValueError: at construction, naming the argument that is out of range.

  Example:
    >>> import jax.numpy as jnp, kstep
    >>> opt = kstep.scale_by_preconditioned_k_control(
    ...     kstep.rms_preconditioner(0.99), 1e-3, apply_fn=lambda p, b: b @ p)
    >>> state = opt.init(jnp.zeros((3, 2)))

  References:
    Cohen et al., `Adaptive gradient methods at the edge of stability
    <https://arxiv.org/abs/2207.14484>`_, 2022.

    Agarwala & Pennington, `High dimensional analysis reveals conservative sharpening and a
    stochastic edge of stability <https://arxiv.org/abs/2404.19261>`_, 2024.
  """
  preconditioners.check(preconditioner, optional=False)
  ctrl_init, step = control.build(
      learning_rate, apply_fn=apply_fn, loss=loss, target=target, decay_steps=decay_steps,
      momentum=preconditioner.momentum, nesterov=False, batch_size=batch_size,
      max_scale=max_scale, trace_floor=trace_floor, estimate=estimate, guard=guard,
      axis_name=axis_name, ema=preconditioner.ema, adaptive=True)

  def control_step(updates, state: ScaleByKControlState, params, extra_args, inv_sqrt):
    params, batch = arguments.check_call(params, extra_args)
    return step(updates, state, params, batch, extra_args.get("probe"), inv_sqrt)

  return preconditioners.wrap(preconditioner, ctrl_init, control_step,
                              PreconditionedKControlState)


def k_controlled_adam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    apply_fn: Callable[[Any, Any], Array],
    loss: str | Callable[..., Array] = "mse",
    target: tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule] | None = None,
    decay_steps: int | optax.Schedule | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    trace_floor: float | str | None = "auto",
    estimate: Estimate = Estimate(),
    guard: Guard | None = Guard(),
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW whose step keeps the preconditioned noise kernel norm K_P in a band below 1.

  Adam's update ``θ ← θ − η P⁻¹ m̂``, ``P = diag(√v̂ + ε)``, is momentum SGD in ``φ = P^{1/2} θ``
  with kernel ``J P⁻¹ Jᵀ`` (``docs/design.md``, "Adaptive optimizers"). The EMA momentum m has
  heavy-ball step η(1 − β₁), so

  .. math::
    K_P = \frac{\eta\, S_P}{2 B}, \qquad
    \eta\, \lambda_{max}(P^{-1} G) < \frac{2 (1 + \beta_1)}{1 - \beta_1},

  S_P the per-example trace of ``H J P⁻¹ Jᵀ`` (per output for MSE), read with P from Adam's own
  second moment at the step being taken. The step is then chosen as by
  :func:`kstep.k_controlled_sgd` (band, annealing, guard). The optimizer is
  :func:`kstep.scale_by_preconditioned_k_control` with the preconditioner
  ``optax.chain(optax.scale_by_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay))``:
  ``optax.adamw`` with its learning-rate scaling replaced by the controller.

  Args:
    learning_rate: the base LR η_base > 0, a float or an optax schedule, moved into the band.
    apply_fn: ``apply_fn(params, batch) -> outputs`` of shape ``(B, C)`` or ``(B, ...)``.
    loss: as for :func:`kstep.k_controlled_sgd`.
    target: the K_P band ``(lo, hi)``; ``None``: (0.55, 1.1) per output for MSE and
      callables, (1.6, 6.4) on the Gauss–Newton trace for the named cross-entropies.
    decay_steps: the band's annealing, as for :func:`kstep.k_controlled_sgd`.
    b1: β₁ in [0, 1), Adam's first-moment EMA (sets the edge ``2(1 + β₁)/(1 − β₁)``).
    b2: β₂ in [0, 1), Adam's second-moment EMA.
    eps: ε ≥ 0 added to ``√v̂``.
    weight_decay: decoupled weight decay ≥ 0 (as ``optax.adamw``, scaled by the step);
      ``None``: none.
    batch_size: B; ``None`` reads it from the outputs (effective batch under accumulation).
    trace_floor: ρ ≥ 0, ``"auto"`` or ``None``, as for SGD, on the preconditioned traces.
    estimate: a :class:`kstep.Estimate` (the fused ``probe=`` is not supported here).
    guard: a :class:`kstep.Guard` on ``η·λ_max(P⁻¹G) ≤ r·2(1 + β₁)/(1 − β₁)``
      (``ratio="auto"``: r = 0.25), or ``None``.
    axis_name: the batch's axis inside ``shard_map``/``pmap``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params,
    batch=batch)`` needs the batch; :func:`kstep.stats` reads K_P (``k``), ``k_learning_rate``,
    ``sharpness_ratio`` (against ``2(1 + β₁)/(1 − β₁)``) and the rest.

  Raises:
    ValueError: at construction, naming the argument that is out of range.

  Example:
    >>> import jax, jax.numpy as jnp, kstep
    >>> apply_fn = lambda p, batch: batch["x"] @ p["w"]
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2))}
    >>> loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.sum((apply_fn(p, b) - b["y"]) ** 2, -1))
    >>> opt = kstep.k_controlled_adam(10.0, apply_fn=apply_fn, decay_steps=100)
    >>> state = opt.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> s = kstep.stats(state)  # lowered until η·λ_max(P⁻¹G) is 0.25 of the edge (the guard)
    >>> round(float(s["k"]), 3), round(float(s["sharpness_ratio"]), 3)
    (0.965, 0.25)

  References:
    Cohen et al., `Adaptive gradient methods at the edge of stability
    <https://arxiv.org/abs/2207.14484>`_, 2022.

    Agarwala & Pennington, `High dimensional analysis reveals conservative sharpening and a
    stochastic edge of stability <https://arxiv.org/abs/2404.19261>`_, 2024.

    Loshchilov & Hutter, `Decoupled weight decay regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  if weight_decay is not None and arguments.is_number(weight_decay) and float(weight_decay) < 0:
    raise ValueError(f"`weight_decay` must be >= 0 or None; got {weight_decay!r}.")
  adam = adam_preconditioner(b1=b1, b2=b2, eps=eps)
  if weight_decay is not None:
    adam = dataclasses.replace(
        adam, transform=optax.chain(adam.transform, optax.add_decayed_weights(weight_decay)),
        diagonal=lambda state, read=adam.diagonal: read(state[0]))
  return scale_by_preconditioned_k_control(
      adam, learning_rate, apply_fn=apply_fn, loss=loss, target=target, decay_steps=decay_steps,
      batch_size=batch_size, trace_floor=trace_floor, estimate=estimate, guard=guard,
      axis_name=axis_name)
