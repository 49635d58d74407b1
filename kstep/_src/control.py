"""The K controller: SGD/momentum whose step keeps K inside a band and η·λ_max below its edge.

:func:`k_controlled_sgd` is the optimizer users call and carries the documentation;
:func:`scale_by_k_control` is its last link, the drop-in replacement for
``optax.scale_by_learning_rate``. How the controller decides is in ``docs/controller.md``, the
definitions in ``docs/design.md``.
"""

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kstep._src import (
  arguments,
  control_state,
  estimators,
  fused,
  k_estimate,
  losses,
  noise_kernel,
  options,
  periodic,
)
from kstep._src.control_state import ScaleByKControlState
from kstep._src.estimators.data_axis import AxisName
from kstep._src.options import (
  FIRST_POWER_ITERS,
  FIRST_PROBES,
  SHARPNESS_NEAR,
  Estimate,
  Guard,
  curvature_edge,
)

Array = jax.Array


def scale_by_k_control(
    learning_rate: optax.ScalarOrSchedule,
    *,
    apply_fn: Callable[[Any, Any], Array],
    loss: str | Callable[..., Array] = "mse",
    target: tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule] | None = None,
    decay_steps: int | optax.Schedule | None = None,
    momentum: float = 0.0,
    nesterov: bool = False,
    batch_size: int | None = None,
    max_scale: float | None = None,
    trace_floor: float | str | None = "auto",
    estimate: Estimate = Estimate(),
    guard: Guard | None = Guard(),
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by ``−η_t``, the step that keeps K in its band and η·λ_max below its edge.

  The last link of :func:`k_controlled_sgd` (``optax.chain(add_decayed_weights, trace,
  scale_by_k_control)``), in place of ``optax.scale_by_learning_rate``; its arguments, the
  control law and the references are documented there. ``momentum`` and ``nesterov`` describe
  the momentum that precedes this transform (``0.0`` here: none); they set α = 1 − μ in K and
  the curvature edge E(μ). ``update`` needs ``params`` and the keyword ``batch=``.

  Args:
    learning_rate: the base LR η_base (see :func:`k_controlled_sgd`).
    apply_fn: ``apply_fn(params, batch)`` -> outputs ``(B, ...)``.
    loss: the loss whose curvature K is measured in.
    target: the K band ``(lo, hi)``; ``None``: the loss's default.
    decay_steps: the band's annealing (an int, a schedule or ``None``).
    momentum: μ of the preceding momentum, in [0, 1).
    nesterov: whether that momentum is Nesterov's.
    batch_size: B; ``None`` reads it from the outputs.
    max_scale: if given, the step never exceeds ``max_scale · η_base``.
    trace_floor: ρ ≥ 0, ``"auto"`` or ``None``.
    estimate: a :class:`kstep.Estimate`.
    guard: a :class:`kstep.Guard`, or ``None`` for no curvature guard.
    axis_name: the batch's axis inside ``shard_map``/``pmap``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`kstep.ScaleByKControlState`.

  Raises:
    ValueError: at construction, naming the argument that is out of range.

  Example:
    >>> import optax, kstep
    >>> opt = optax.chain(optax.trace(decay=0.5),
    ...                   kstep.scale_by_k_control(0.1, apply_fn=lambda p, b: b @ p,
    ...                                            momentum=0.5))
  """
  init_fn, step = build(
      learning_rate, apply_fn=apply_fn, loss=loss, target=target, decay_steps=decay_steps,
      momentum=momentum, nesterov=nesterov, batch_size=batch_size, max_scale=max_scale,
      trace_floor=trace_floor, estimate=estimate, guard=guard, axis_name=axis_name)

  def update_fn(updates, state: ScaleByKControlState, params=None, **extra_args):
    params, batch = arguments.check_call(params, extra_args)
    return step(updates, state, params, batch, extra_args.get("probe"))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def build(learning_rate, *, apply_fn, loss, target, decay_steps, momentum, nesterov, batch_size,
          max_scale, trace_floor, estimate, guard, axis_name, ema: bool = False,
          adaptive: bool = False):
  """The controller's ``init`` and its step ``step(updates, state, params, batch, probe,
  inv_sqrt=None)``, arguments checked (see :func:`scale_by_k_control`).

  ``ema``: the momentum μ before the controller is an EMA (Adam's ``m``, step η(1 − μ) in
  heavy-ball terms): K = η S / (2B) and the curvature edge E(μ)/(1 − μ). ``inv_sqrt``: a
  function returning ``P^{-1/2}`` of a diagonal preconditioner, called only inside the estimate;
  K and λ_max are then those of the preconditioned kernel (``docs/design.md``, "Adaptive
  optimizers"). ``adaptive``: the default band is the adaptive controller's.
  """
  arguments.check_learning_rate(learning_rate, optional=False)
  arguments.check_callable("apply_fn", apply_fn, "apply_fn(params, batch) -> outputs")
  spec = losses.resolve_loss(loss)
  options.check_group("estimate", estimate, Estimate, optional=False)
  options.check_group("guard", guard, Guard, optional=True)
  norm = k_estimate.resolve_output_norm(estimate.output_norm, loss)
  target = options.default_target(loss, norm, adaptive) if target is None else target
  arguments.check_band(target)
  decay_fn = arguments.band_decay_fn(decay_steps)
  arguments.check_momentum(momentum)
  if not isinstance(nesterov, bool):
    raise ValueError(f"`nesterov` must be a bool; got {nesterov!r}.")
  if batch_size is not None:
    arguments.check_positive_int("batch_size", batch_size)
  arguments.check_optional("max_scale", max_scale, 0.0)
  trace_floor = options.resolve_trace_floor(trace_floor, loss)
  estimators.check_probe_scope(estimate.probe_scope, axis_name)
  every, num_probes, estimator = estimate.every, estimate.num_probes, estimate.estimator
  probe_batch_size, smoothing, max_change = (estimate.probe_batch_size, estimate.smoothing,
                                             estimate.max_change)
  probe_scope, seed = estimate.probe_scope, estimate.seed
  guard_ratio = options.resolve_guard_ratio(guard, loss, adaptive)
  # Without a guard only the floor's NTK probe follows refresh_every (the Guard's default).
  power_iters = options.guard_or_default(guard).power_iters
  refresh_every = options.guard_or_default(guard).refresh_every
  guard = guard is not None
  lo_sched, hi_sched = target

  def init_fn(params: Any) -> ScaleByKControlState:
    arguments.check_real_params(params, "k_controlled_sgd")
    nan = jnp.full((), jnp.nan, jnp.float32)
    izero = jnp.zeros((), jnp.int32)
    key = arguments.prng_key(seed)
    vector = estimators.random_unit(jax.random.split(key)[1], params) if guard else ()
    return ScaleByKControlState(
        count=izero, key=key, k=nan, k_scale=nan, k_trace=nan, k_trace_raw=nan,
        k_trace_stderr=nan, k_trace_var=jnp.zeros((), jnp.float32), k_ntk_scale=nan,
        k_learning_rate=nan,
        k_base_learning_rate=nan, k_num_outputs=izero, k_num_estimates=izero,
        k_num_skipped=izero, k_num_raised=izero, k_num_lowered=izero, k_num_capped=izero,
        gn_lambda_max=nan, sharpness_ratio=nan, sharpness_num_estimates=izero,
        sharpness_num_skipped=izero, sharpness_growth=nan,
        gn_eigenvector=vector, next_estimate=jnp.asarray(control_state.COLD, jnp.int32),
    )

  def measure(state: ScaleByKControlState, params: Any, batch: Any, cold: bool, full: bool,
              inv_sqrt: Callable[[], Any] | None, out_shape: tuple[int, ...], c: int):
    # The first valid estimate sets S̄ alone, so its trace gets the whole batch and FIRST_PROBES
    # times the probes (one probe's spread is ~40% of T at init), and FIRST_POWER_ITERS power
    # steps on the probe rows (those of every later estimate), one after another with a forward
    # pass each: the memory of one probe, not more than the training step's (controller.md).
    rows = k_estimate.probe_rows(apply_fn, params, batch, probe_batch_size, axis_name=axis_name,
                                 out_shape=out_shape)
    if not cold:
      batch = rows
    return k_estimate.estimate(
        apply_fn, params, batch, loss=spec, key=jax.random.fold_in(state.key, state.count),
        output_norm=norm, num_probes=num_probes * (FIRST_PROBES if cold else 1),
        estimator=estimator, trace_floor=trace_floor,
        eigenvector=state.gn_eigenvector if guard and full else None,
        power_iters=FIRST_POWER_ITERS if cold else power_iters,
        ntk_scale=None if full or trace_floor is None else state.k_ntk_scale,
        axis_name=axis_name, probe_scope=probe_scope,
        inv_sqrt=None if inv_sqrt is None else inv_sqrt(),
        power_batch=rows if cold and rows is not batch else None, one_at_a_time=cold,
        num_outputs=c,
    )

  def estimate(state: ScaleByKControlState, params: Any, batch: Any, probe: Any,
               out_shape: tuple[int, ...], c: int,
               inv_sqrt: Callable[[], Any] | None) -> ScaleByKControlState:
    # state.next_estimate, set by the last update: the first (cold) estimate, a full one (power
    # steps, the floor's probe) or a light one reusing λ̄, the vector and the floor's NTK scale.
    # Each branch absorbs its own estimate, so a light one never touches the guard's vector.
    absorb = lambda est, first, full: control_state.absorb(
        state, est, first=first, full=full, guard=guard, smoothing=smoothing,
        max_change=max_change)
    own = lambda cold, full: absorb(
        measure(state, params, batch, cold, full, inv_sqrt, out_shape, c), cold, full)
    branches = [lambda: own(True, True)]
    if probe is None:
      branches += [lambda: own(False, True), lambda: own(False, False)]
    else:
      from_probe = lambda full: absorb(fused.estimate_from_probe(
          probe, state, full=full, num_outputs=c, output_norm=norm, trace_floor=trace_floor),
          False, full)
      branches += [lambda: from_probe(True), lambda: from_probe(False)]
    mode = state.next_estimate
    if not (guard or trace_floor is not None):
      branches = branches[:2]  # light = full without guard and floor
      mode = jnp.where(mode == control_state.LIGHT, control_state.FULL, mode)
    index = jnp.where(mode == control_state.COLD, 0, jnp.where(mode == control_state.FULL, 1, 2))
    return jax.lax.switch(index, branches)

  def step(updates, state: ScaleByKControlState, params, batch, probe, inv_sqrt=None):
    arguments.check_real_params(params, "k_controlled_sgd")
    # The model's output shape, traced once (B, C and the probe rows read it).
    out_shape = jax.eval_shape(lambda p: apply_fn(p, batch), params).shape
    b, c = k_estimate.batch_rows(apply_fn, params, batch, batch_size, axis_name=axis_name,
                                 out_shape=out_shape, loss=spec)
    if probe is not None and inv_sqrt is not None:
      raise ValueError("kstep.value_and_grad's fused probe measures the unpreconditioned kernel; "
                       "an adaptive controller (kstep.k_controlled_adam) estimates on its own: "
                       "call update without `probe=`.")
    if probe is not None:
      fused.check_probe(probe, loss=spec, trace_floor=trace_floor, num_probes=num_probes,
                        power_iters=power_iters, probe_batch_size=probe_batch_size,
                        estimator=estimator, output_norm=norm, axis_name=axis_name)
    state = periodic.when_due(  # after the backward pass
        state.count, every, updates,
        lambda s: estimate(s, params, batch, probe, out_shape, c, inv_sqrt), state)
    count = state.count
    base = arguments.schedule_value(learning_rate, count)
    lo = arguments.schedule_value(lo_sched, count)
    hi = arguments.schedule_value(hi_sched, count)
    if decay_fn is not None:
      d = arguments.schedule_value(decay_fn, count)
      lo, hi = d * lo, d * hi
    # An EMA momentum's step is η(1 − μ) in heavy-ball terms: K counts it as no momentum (α = 1).
    k_momentum = 0.0 if ema else momentum
    alpha = 1.0 - jnp.asarray(k_momentum, jnp.float32)
    has_scale = state.k_num_estimates > 0
    eta_one = 2.0 * alpha * b / jnp.where(has_scale, state.k_scale, 1.0)
    eta = jnp.where(has_scale, jnp.clip(base, lo * eta_one, hi * eta_one), base)
    if max_scale is not None:
      eta = jnp.minimum(eta, max_scale * base)
    capped = jnp.bool_(False)
    ratio = jnp.full((), jnp.nan, jnp.float32)
    if guard:
      edge = curvature_edge(momentum, nesterov, ema)
      has_lam = jnp.isfinite(state.gn_lambda_max)
      cap = guard_ratio * edge / jnp.where(has_lam, state.gn_lambda_max, 1.0)
      capped = has_lam & (eta > cap)
      eta = jnp.where(capped, cap, eta)
      ratio = jnp.where(has_lam, eta * state.gn_lambda_max / edge, jnp.nan)
    k = jnp.where(has_scale, noise_kernel.k_from_trace(eta, b, state.k_scale, k_momentum),
                  jnp.nan)
    updates = jax.tree.map(lambda u: (-eta * u).astype(u.dtype), updates)
    state = state._replace(
        count=optax.safe_increment(count), k=k.astype(jnp.float32), k_learning_rate=eta,
        k_base_learning_rate=base, k_num_outputs=jnp.asarray(c, jnp.int32),
        k_num_raised=state.k_num_raised + (eta > base).astype(jnp.int32),
        k_num_lowered=state.k_num_lowered + (eta < base).astype(jnp.int32),
        k_num_capped=state.k_num_capped + capped.astype(jnp.int32),
        sharpness_ratio=ratio.astype(jnp.float32),
    )
    near = ~(ratio < SHARPNESS_NEAR * guard_ratio) if guard else None
    return updates, state._replace(next_estimate=control_state.next_estimate(
        state, every=every, refresh_every=refresh_every, near=near))

  return init_fn, step


def k_controlled_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    apply_fn: Callable[[Any, Any], Array],
    loss: str | Callable[..., Array] = "mse",
    target: tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule] | None = None,
    decay_steps: int | optax.Schedule | None = None,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    max_scale: float | None = None,
    trace_floor: float | str | None = "auto",
    estimate: Estimate = Estimate(),
    guard: Guard | None = Guard(),
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with momentum whose step keeps the noise kernel norm K in a band below 1.

  For mini-batch SGD with batch size B, step η and heavy-ball momentum μ, the noise kernel
  norm is (docs/design.md, eq. (11))

  .. math::
    K = \frac{\eta}{2 (1 - \mu) B}\, S,

  with S the per-example NTK trace per output (MSE) or the Gauss–Newton trace
  (cross-entropy). Training diverges near K = 1 at small batch; at large batch the curvature
  edge ``η·λ_max < E(μ) = 2(1 + μ)`` binds first. Every ``estimate.every`` updates, inside
  the jitted ``update``, S and the Gauss–Newton λ_max are estimated on the current batch
  (smoothed: S̄, λ̄), and the step is

  .. math::
    \eta_t = \min\bigl(\mathrm{clip}(\eta_{base}(t),\, d(t)\,lo\,\eta_1,\, d(t)\,hi\,\eta_1),\;
      r\,E(\mu)/\bar\lambda\bigr), \qquad \eta_1 = 2 (1 - \mu) B / \bar S,

  η₁ the step at K = 1, d(t) the band's annealing and r the guard's ratio. A base LR inside
  both limits passes unchanged. How it decides: ``docs/controller.md``; the evidence for each
  default: ``docs/defaults.md``. The optimizer is ``optax.chain(add_decayed_weights(
  weight_decay), trace(momentum, nesterov), scale_by_k_control(...))``: optax's ``sgd`` with
  its learning-rate scaling replaced by :func:`scale_by_k_control`. Under
  :func:`kstep.inject_hyperparams`, ``learning_rate``, ``momentum``, ``weight_decay``,
  ``max_scale`` and a numeric ``trace_floor`` are hyperparameters; the other arguments are
  static.

  Args:
    learning_rate: the base LR η_base > 0, a float or an optax schedule; the controller moves
      it into the band, so any value from 1e-4 to 3 trains.
    apply_fn: ``apply_fn(params, batch) -> outputs`` of shape ``(B, C)`` or ``(B, ...)``: the
      model on the batch passed to ``update``. With a cross-entropy, ``(B, T, V)`` logits are
      ``B·T`` examples of ``V`` classes (a language model's tokens; ``docs/design.md``).
    loss: ``"mse"`` (ℓ = ½ Σ_c (f_c − y_c)²), ``"softmax_cross_entropy"``,
      ``"sigmoid_binary_cross_entropy"`` or a callable ``(outputs, batch) -> (B,)`` per-example
      losses (its output Hessian is derived by autodiff).
    target: the K band ``(lo, hi)``, ``0 < lo < hi``, each end a float or a schedule, in the
      estimate's output norm. ``None``: (0.25, 0.4) per output for MSE and callables, (0.7, 0.8)
      on the Gauss–Newton trace for the named cross-entropies (docs/defaults.md).
    decay_steps: anneal the band for a run of known length: an int N multiplies both ends by a
      cosine from 1 to 0 over N updates; an optax schedule of the update count is the
      multiplier itself. ``None``: a constant band (holds the step at its edge).
    momentum: heavy-ball μ in [0, 1) (optax's ``trace``); a Python ``0`` leaves it out.
    nesterov: Nesterov momentum (its curvature edge is ``2(1 + μ)/(1 + 2μ)``).
    weight_decay: decoupled L2 coefficient ≥ 0 added to the gradient before momentum, as
      ``optax.add_decayed_weights``; ``None``: none.
    batch_size: B; ``None`` reads it from the outputs' leading dimension (the global batch
      under sharding; times T for ``(B, T, V)`` cross-entropy logits). Under gradient
      accumulation (``optax.MultiSteps``) give the effective batch, a multiple of the
      micro-batch; any other mismatch raises ``ValueError``.
    max_scale: if given (> 0), the step never exceeds ``max_scale · η_base``
      (``max_scale=1``: the controller only ever lowers the base LR).
    trace_floor: ρ ≥ 0: ``S ← max(S, ρ·S_NTK)`` (one more probe), against the collapse of the
      Gauss–Newton trace as a softmax saturates. ``"auto"``: 0.03 for the named
      cross-entropies, none otherwise; ``None``: off.
    estimate: how S is measured: a :class:`kstep.Estimate` (every 10 updates, one probe on 16
      rows of the batch, smoothed; see its attributes).
    guard: the curvature guard, a :class:`kstep.Guard` (``η·λ_max ≤ r·E(μ)``, r = 0.5 for
      MSE, 0.25 for cross-entropy); ``None`` turns it off.
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split over. Not needed
      under ``jax.jit`` with sharded arrays (docs/data_parallel.md).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``update(grads, state, params,
    batch=batch)`` needs the batch the gradients came from; :func:`kstep.stats` reads ``k``,
    ``k_learning_rate``, ``k_trace``, ``sharpness_ratio`` and the rest (NaN before the first
    measurement).

  Raises:
    ValueError: at construction, naming the argument that is out of range; in ``update``, when
      ``batch=`` or ``params`` is missing or ``batch_size`` differs from the batch.

  Example:
    >>> import jax, jax.numpy as jnp, optax, kstep
    >>> apply_fn = lambda p, batch: batch["x"] @ p["w"]
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2))}
    >>> loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.sum((apply_fn(p, b) - b["y"]) ** 2, -1))
    >>> opt = kstep.k_controlled_sgd(10.0, apply_fn=apply_fn, decay_steps=100)
    >>> state = opt.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> s = kstep.stats(state)
    >>> round(float(s["k"]), 3), bool(s["k_learning_rate"] < 10.0)  # lowered to the band's top
    (0.4, True)

  References:
    Agarwala & Pennington, `High dimensional analysis reveals conservative sharpening and a
    stochastic edge of stability <https://arxiv.org/abs/2404.19261>`_, 2024.

    Cohen et al., `Gradient descent on neural networks typically occurs at the edge of
    stability <https://arxiv.org/abs/2103.00065>`_, ICLR 2021.

    Andreyev & Beneventano, `Edge of stochastic stability: revisiting the edge of stability for
    SGD <https://arxiv.org/abs/2412.20553>`_, 2024.

    Andreyev, Ananthkumar, Walden, Poggio & Beneventano, `Momentum further constrains
    sharpness at the edge of stochastic stability <https://arxiv.org/abs/2604.14108>`_, 2026.
  """
  if weight_decay is not None and arguments.is_number(weight_decay) and float(weight_decay) < 0:
    raise ValueError(f"`weight_decay` must be >= 0 or None; got {weight_decay!r}.")
  arguments.check_momentum(momentum)
  # Which parts the chain holds depends only on what is static: None drops weight decay, a
  # Python zero drops momentum; an array (e.g. injected) keeps its part in init and update alike.
  parts = []
  if weight_decay is not None:
    parts.append(optax.add_decayed_weights(weight_decay))
  if not (isinstance(momentum, numbers.Number) and float(momentum) == 0.0):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(scale_by_k_control(
      learning_rate, apply_fn=apply_fn, loss=loss, target=target, decay_steps=decay_steps,
      momentum=momentum, nesterov=nesterov, batch_size=batch_size, max_scale=max_scale,
      trace_floor=trace_floor, estimate=estimate, guard=guard, axis_name=axis_name))
  return optax.chain(*parts)
