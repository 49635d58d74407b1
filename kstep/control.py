"""The K controller: SGD/momentum whose step keeps K inside a band and η·λ_max below its edge.

``K = η S / (2 α B)`` (K paper eq. 11/18/87) with α = 1 − momentum, B the batch size and S the
kernel scale of :mod:`kstep.k_estimate` (the NTK trace per output for MSE, the Gauss–Newton trace
for the cross-entropies). Every ``every`` steps, inside the jitted update (``lax.cond``), the
controller estimates S on the current batch, smooths it across estimates, and takes

    η_t = min(clip(η_base(t), d(t)·lo(t)·η₁, d(t)·hi(t)·η₁), max_scale·η_base(t), η_cap),
    η₁ = 2 α B / S̄ (the step at which K = 1),   η_cap = r · E(μ) / λ̄,

where d(t) is the band's decay (1, or a cosine over ``decay_steps``: the annealed band), λ̄ the
top eigenvalue of the Gauss–Newton matrix on the estimate's batch (power iteration warm-started
from the previous estimate's vector; held: ``λ̄ ← max(λ̂, 0.8·λ̄)``, so one low estimate cannot
release the cap; refreshed at every ``refresh_every``-th estimate, and while the step is within a
factor 2 of its cap at every one, or every other one while λ is steady) and E(μ) the curvature
edge of the momentum method on a quadratic: ``η λ < 2(1 + μ)`` for heavy ball (2 for plain SGD)
and ``η λ < 2(1 + μ)/(1 + 2μ)`` for Nesterov (optax's form; from the Jury conditions of
``z² − τz + μ(1 − ηλ)`` with ``τ = 1 + μ − ηλ(1 + μ)``). The noise edge (K) binds at small batch,
the curvature edge at large batch (design doc, "Two edges"). A base LR inside both passes
unchanged.

Smoothing: ``S̄ ← d·S̄ + (1 − d)·clip(Ŝ, S̄/r, r·S̄)`` with ``d = smoothing`` and ``r = max_change``;
the first valid estimate sets S̄ directly, so a far-off base LR is corrected before the first
update. An estimate that is NaN, ±Inf or ≤ 0 is skipped and counted; a λ estimate that is not
finite and positive is skipped too. Neither reaches the step or the state. Measured stats read
NaN until their first valid estimate.
"""

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kstep import (arguments, control_state, estimators, fused, k_estimate, losses,
                   noise_kernel, periodic)
from kstep.control_defaults import (
  DEFAULT_PROBE_BATCH_SIZE,
  DEFAULT_REFRESH_EVERY,
  DEFAULT_SHARPNESS_ITERS,
  FIRST_POWER_ITERS,
  FIRST_PROBES,
  SHARPNESS_NEAR,
  curvature_edge,
  default_target,
  resolve_max_sharpness_ratio,
  resolve_trace_floor,
)
from kstep.control_state import ScaleByKControlState
from kstep.estimators.data_axis import AxisName

Array = jax.Array

def scale_by_k_control(
    learning_rate: optax.ScalarOrSchedule,
    *,
    apply_fn: Callable[[Any, Any], Array],
    loss: str | Callable[..., Array] = "mse",
    batch_size: int | None = None,
    target: tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule] | None = None,
    output_norm: str = "auto",
    momentum: float = 0.0,
    nesterov: bool = False,
    every: int = 10,
    num_probes: int = 1,
    estimator: str = "hutchinson",
    max_sharpness_ratio: float | str | None = "auto",
    sharpness_iters: int = DEFAULT_SHARPNESS_ITERS,
    refresh_every: int = DEFAULT_REFRESH_EVERY,
    probe_batch_size: int | None = DEFAULT_PROBE_BATCH_SIZE,
    decay_steps: int | None = None,
    band_decay: optax.Schedule | None = None,
    smoothing: float = 0.8,
    max_change: float = 4.0,
    max_scale: float | None = None,
    trace_floor: float | str | None = "auto",
    seed: int = 0,
    flip_sign: bool = True,
    axis_name: AxisName = None,
    probe_scope: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by ``−η_t``, the step that keeps K in ``target`` and η·λ_max below its edge.

  The drop-in replacement for ``optax.scale_by_learning_rate`` at the end of an SGD/momentum
  chain (control law in the module docstring); :func:`k_controlled_sgd` is the assembled
  optimizer. ``update`` needs ``params`` and the extra keyword ``batch=`` (the batch the gradients
  came from; ``apply_fn(params, batch)``).

  Args:
    learning_rate: base LR η_base > 0, a float or an optax schedule of the step count.
    apply_fn: ``apply_fn(params, batch)`` -> outputs ``(B, C)`` or ``(B, ...)``.
    loss: ``"mse"`` (ℓ = ½ Σ_c (f_c − y_c)²), ``"softmax_cross_entropy"``,
      ``"sigmoid_binary_cross_entropy"`` or a per-example callable ``(outputs, batch) -> (B,)``.
    batch_size: B; ``None`` (default) reads it from the outputs' leading dimension (static under
      jit; the global batch under sharding; summed over ``axis_name``). A given value that
      differs from the batch raises ``ValueError`` naming both.
    target: ``(lo, hi)``, the K band in the chosen ``output_norm``, each end a float or a
      schedule, ``0 < lo < hi``. ``None``: (0.25, 0.4) per output (MSE's best band in the MNIST
      band sweep, (2.6, 3.9) over 10 outputs), (0.7, 0.8) on the Gauss–Newton trace for the
      named cross-entropies and (0.4, 0.8) for other losses on the total trace. CE's band:
      with ``decay_steps`` and 3 seeds the worst of 10 base LRs 1e-4…3 sat at the band's lower
      edge; (0.4, 0.8) lost 1.0 point to the best cosine on MNIST B = 64, (0.7, 0.8) with
      r = 0.25 lost 0.2–0.3 on digits and MNIST at B = 64 and 1024 (benchmarks README).
    output_norm: ``"per_output"``, ``"max_output"``, ``"total"`` or ``"auto"`` (per output for
      MSE and callables, total for the cross-entropies); see :mod:`kstep.k_estimate`.
    momentum: μ of the momentum that precedes this transform (α = 1 − μ; the curvature edge).
    nesterov: whether that momentum is Nesterov's (the curvature edge).
    every: estimate every ``every`` updates (the first at update 0).
    num_probes: probes per estimate (``FIRST_PROBES`` times as many, on the whole batch, at the
      first estimate, which sets S̄ alone).
    estimator: ``"hutchinson"`` (probes) or ``"exact"`` (per-example Jacobians).
    max_sharpness_ratio: r in (0, 1]: keep ``η·λ_max ≤ r·E(μ)``; ``None`` turns the guard off;
      ``"auto"`` (default): 0.5 for MSE and callables, 0.25 for the named cross-entropies.
      MSE, measured (digits MLP, 10-class MSE, base LR 3, band (0.3, 0.6) per output, 60
      steps): r = 0.5 trained at B = 256 and 1024; r = 1.0 diverged at B = 256 (the power
      iteration's λ lags behind a sharpening direction); r = 0.7 trained at B = 1024; on the
      MNIST parity rows at B = 1024 r = 0.25 lost 0.5 point to the best cosine, r = 0.5 0.1.
      CE (digits B = 1024, annealed, 3 seeds, 10 base LRs, worst vs best cosine): r = 0.7
      −3.4, 0.5 −1.4, 0.35 −0.7, 0.25 −0.2 points (r = 1.0: worst accuracy 0.30, earlier).
    sharpness_iters: power steps per estimate (one JVP and one VJP each; ``FIRST_POWER_ITERS``
      at the first), after which λ is read as the Rayleigh quotient of the last vector (one
      more JVP). Default 1: the λ that two plain power steps read off their last product, at
      three passes instead of four; the vector advances one step per estimate. Measured: the
      parity rows of digits and MNIST (B = 64 and 1024, 3 seeds) within 0.2 point of the
      previous default, an estimate ~0.1 SGD step cheaper (benchmarks README). Before, with λ
      read off the last product and no extra JVP: one step ended CE at 8–20 % test accuracy
      (digits MLP, B = 1024: λ̂ lagged the sharpening of the first 50 steps), two trained.
    refresh_every: m ≥ 1: the guard's power steps and the trace floor's NTK probe run at every
      m-th estimate (the first included); at the others the floor reuses its last NTK scale and
      the guard keeps λ̄ and its vector, unless the last step's ``η·λ̄`` was above
      ``SHARPNESS_NEAR`` (½) of its cap ``r·E(μ)``, when both run, at every estimate or, while
      the last refresh found λ̂ at most ``SHARPNESS_STEADY`` (1.1) times the λ̄ the cap had
      used, at every other one. Where the noise edge binds (small batch) the guard sits far
      below its cap and costs 1/m of its price; where the curvature edge binds (large batch) it
      runs at every estimate while λ grows, at every other one while it is steady (MNIST MLP
      parity runs, B = 1024, base LR 3, seed 0: MSE ran the power steps at 62 % of the
      estimates instead of 88 %, CE 38 % instead of 53 %). A skipped guard was ≥ 2× below its
      cap (4× below the edge at the defaults), or its λ̄ is one estimate old and λ had grown
      ≤ 10 % in the last one. ``1``: both at every estimate. Default 8: against 4 it left the
      digits and MNIST parity rows (3 seeds, 10 base LRs) and the reduced CIFAR rows (base
      LRs 1e-4 and 1) within 0.01 point, and cut the MNIST MLP step at every=10 (CE) from
      1.058 to 1.043 × ``optax.sgd`` (5 fresh processes; benchmarks README).
    probe_batch_size: estimate on every ``B // probe_batch_size``-th example of the batch (the
      trace, its floor and the guard's λ_max): T is a per-example mean, so a sub-batch is
      unbiased for it at a fraction of the cost; the sub-batch's Gauss–Newton λ_max is, if
      anything, above the batch's (a more cautious guard). ``None``: the whole batch. Default
      16: every parity row held as with 32 (3 seeds) and the MNIST MLP step at every=10 cost
      1.046 / 1.062 × ``optax.sgd`` (MSE / CE) instead of 1.095 / 1.087 (benchmarks README).
    decay_steps: anneal the band: multiply both ends by a cosine from 1 to 0 over this many
      updates (a run of known length). ``None``: a constant band.
    band_decay: instead of ``decay_steps``, any optax schedule of the update count giving the
      band's multiplier.
    smoothing: d in [0, 1), the weight of the old S̄ in each new estimate.
    max_change: r > 1, the most one raw estimate may differ from S̄ (as a factor).
    max_scale: if given, the step never exceeds ``max_scale · η_base``.
    trace_floor: ρ ≥ 0: ``Ŝ ← max(Ŝ, ρ · Ŝ_NTK)`` (one more probe). ``"auto"``: 0.03 for the
      cross-entropies (the Gauss–Newton trace collapses as a softmax saturates; README,
      "Cross-entropy"), none for MSE and callables; ``None``: off.
    seed: int seed of the probes (the key is made in ``init``).
    flip_sign: multiply by ``−η`` (descent) rather than ``η``.
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split over (params
      replicated over it). Not needed under ``jax.jit`` with sharded arrays.
    probe_scope: ``"global"`` or ``"per_shard"`` (only with ``axis_name``), as in
      :func:`kstep.gauss_newton_trace`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByKControlState`.

  Raises:
    ValueError: at construction, naming the argument that is out of range.
  """
  arguments.check_learning_rate(learning_rate, optional=False)
  arguments.check_callable("apply_fn", apply_fn, "apply_fn(params, batch) -> outputs")
  losses.resolve_loss(loss)
  norm = k_estimate.resolve_output_norm(output_norm, loss)
  target = default_target(loss, norm) if target is None else target
  arguments.check_band(target)
  if batch_size is not None:
    arguments.check_positive_int("batch_size", batch_size)
  arguments.check_momentum(momentum)
  if not isinstance(nesterov, bool):
    raise ValueError(f"`nesterov` must be a bool; got {nesterov!r}.")
  arguments.check_positive_int("every", every)
  num_probes = arguments.check_static_int(
      "num_probes", num_probes, "sets the number of probes (a shape)"
  )
  if estimator not in estimators.METHODS:
    raise ValueError(f"`estimator` must be one of {estimators.METHODS}; got {estimator!r}.")
  max_sharpness_ratio = resolve_max_sharpness_ratio(max_sharpness_ratio, loss)
  sharpness_iters = arguments.check_static_int(
      "sharpness_iters", sharpness_iters, "sets the number of power steps (unrolled)"
  )
  arguments.check_positive_int("refresh_every", refresh_every)
  if probe_batch_size is not None:
    probe_batch_size = arguments.check_static_int(
        "probe_batch_size", probe_batch_size, "sets the sub-batch's stride (a shape)"
    )
  decay_fn = arguments.band_decay_fn(decay_steps, band_decay)
  estimators.check_probe_scope(probe_scope, axis_name)
  if arguments.is_number(smoothing) and not 0.0 <= float(smoothing) < 1.0:
    raise ValueError(f"`smoothing` must be in [0, 1); got {smoothing!r}.")
  if arguments.is_number(max_change) and not float(max_change) > 1.0:
    raise ValueError(f"`max_change` must be > 1; got {max_change!r}.")
  arguments.check_optional("max_scale", max_scale, 0.0)
  trace_floor = resolve_trace_floor(trace_floor, loss)
  arguments.check_seed(seed)
  guard = max_sharpness_ratio is not None
  spec = losses.resolve_loss(loss)
  lo_sched, hi_sched = target
  sign = -1.0 if flip_sign else 1.0

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

  def measure(state: ScaleByKControlState, params: Any, batch: Any, cold: bool, full: bool):
    # The first valid estimate sets S̄ alone, so it gets the whole batch, FIRST_PROBES times the
    # probes and FIRST_POWER_ITERS power steps (one probe's spread is ~40% of T at init).
    if not cold:
      batch = k_estimate.probe_rows(apply_fn, params, batch, probe_batch_size,
                                    axis_name=axis_name)
    return k_estimate.estimate(
        apply_fn, params, batch, loss=spec, key=jax.random.fold_in(state.key, state.count),
        output_norm=norm, num_probes=num_probes * (FIRST_PROBES if cold else 1),
        estimator=estimator, trace_floor=trace_floor,
        eigenvector=state.gn_eigenvector if guard and full else None,
        power_iters=FIRST_POWER_ITERS if cold else sharpness_iters,
        ntk_scale=None if full or trace_floor is None else state.k_ntk_scale,
        axis_name=axis_name, probe_scope=probe_scope,
    )

  def estimate(state: ScaleByKControlState, params: Any, batch: Any, probe: Any,
               c: int) -> ScaleByKControlState:
    # state.next_estimate, set by the last update: the first (cold) estimate, a full one (power
    # steps, the floor's probe) or a light one reusing λ̄, the vector and the floor's NTK scale.
    # Each branch absorbs its own estimate, so a light one never touches the guard's vector.
    absorb = lambda est, first, full: control_state.absorb(
        state, est, first=first, full=full, guard=guard, smoothing=smoothing,
        max_change=max_change)
    branches = [lambda: absorb(measure(state, params, batch, True, True), True, True)]
    if probe is None:
      branches.append(lambda: absorb(measure(state, params, batch, False, True), False, True))
      branches.append(lambda: absorb(measure(state, params, batch, False, False), False, False))
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

  def update_fn(updates, state: ScaleByKControlState, params=None, **extra_args):
    batch = extra_args.get("batch")
    if batch is None:
      raise ValueError(
          "kstep's K controller estimates K on the batch the gradients came from: call "
          "`opt.update(grads, state, params, batch=batch)` (inside optax.chain the keyword is "
          "forwarded; with flax nnx, `optimizer.update(model, grads, batch=batch)`)."
      )
    if params is None:
      raise ValueError("kstep's K controller needs `params`: opt.update(grads, state, params, "
                       "batch=batch).")
    arguments.check_real_params(params, "k_controlled_sgd")
    b, c = k_estimate.batch_rows(apply_fn, params, batch, batch_size, axis_name=axis_name)
    probe = extra_args.get("probe")
    if probe is not None:
      fused.check_probe(probe, loss=spec, trace_floor=trace_floor, num_probes=num_probes,
                        sharpness_iters=sharpness_iters, probe_batch_size=probe_batch_size,
                        estimator=estimator, output_norm=norm, axis_name=axis_name)
    state = jax.lax.cond(
        periodic.due(state.count, every, updates),  # after the backward pass
        lambda s: estimate(s, params, batch, probe, c), lambda s: s, state,
    )
    count = state.count
    base = arguments.schedule_value(learning_rate, count)
    lo = arguments.schedule_value(lo_sched, count)
    hi = arguments.schedule_value(hi_sched, count)
    if decay_fn is not None:
      d = arguments.schedule_value(decay_fn, count)
      lo, hi = d * lo, d * hi
    alpha = 1.0 - jnp.asarray(momentum, jnp.float32)
    has_scale = state.k_num_estimates > 0
    eta_one = 2.0 * alpha * b / jnp.where(has_scale, state.k_scale, 1.0)
    eta = jnp.where(has_scale, jnp.clip(base, lo * eta_one, hi * eta_one), base)
    if max_scale is not None:
      eta = jnp.minimum(eta, max_scale * base)
    capped = jnp.bool_(False)
    ratio = jnp.full((), jnp.nan, jnp.float32)
    if guard:
      edge = curvature_edge(momentum, nesterov)
      has_lam = jnp.isfinite(state.gn_lambda_max)
      cap = max_sharpness_ratio * edge / jnp.where(has_lam, state.gn_lambda_max, 1.0)
      capped = has_lam & (eta > cap)
      eta = jnp.where(capped, cap, eta)
      ratio = jnp.where(has_lam, eta * state.gn_lambda_max / edge, jnp.nan)
    k = jnp.where(has_scale, noise_kernel.k_from_trace(eta, b, state.k_scale, momentum), jnp.nan)
    updates = jax.tree.map(lambda u: (sign * eta * u).astype(u.dtype), updates)
    state = state._replace(
        count=optax.safe_increment(count), k=k.astype(jnp.float32), k_learning_rate=eta,
        k_base_learning_rate=base, k_num_outputs=jnp.asarray(c, jnp.int32),
        k_num_raised=state.k_num_raised + (eta > base).astype(jnp.int32),
        k_num_lowered=state.k_num_lowered + (eta < base).astype(jnp.int32),
        k_num_capped=state.k_num_capped + capped.astype(jnp.int32),
        sharpness_ratio=ratio.astype(jnp.float32),
    )
    near = ~(ratio < SHARPNESS_NEAR * max_sharpness_ratio) if guard else None
    return updates, state._replace(next_estimate=control_state.next_estimate(
        state, every=every, refresh_every=refresh_every, near=near))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def k_controlled_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    apply_fn: Callable[[Any, Any], Array],
    loss: str | Callable[..., Array] = "mse",
    batch_size: int | None = None,
    target: tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule] | None = None,
    output_norm: str = "auto",
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float | None = None,
    every: int = 10,
    num_probes: int = 1,
    estimator: str = "hutchinson",
    max_sharpness_ratio: float | str | None = "auto",
    sharpness_iters: int = DEFAULT_SHARPNESS_ITERS,
    refresh_every: int = DEFAULT_REFRESH_EVERY,
    probe_batch_size: int | None = DEFAULT_PROBE_BATCH_SIZE,
    decay_steps: int | None = None,
    band_decay: optax.Schedule | None = None,
    smoothing: float = 0.8,
    max_change: float = 4.0,
    max_scale: float | None = None,
    trace_floor: float | str | None = "auto",
    seed: int = 0,
    axis_name: AxisName = None,
    probe_scope: str = "global",
) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum whose step keeps K inside ``target`` and η·λ_max below its edge.

  ``optax.chain(add_decayed_weights(weight_decay), trace(momentum, nesterov),
  scale_by_k_control(learning_rate, ...))``: the chain of ``optax.sgd`` with the final
  learning-rate scaling replaced by the K controller (see :func:`scale_by_k_control` for the
  control law and every argument). ``weight_decay=None`` (default) and ``momentum=0`` leave
  their parts out, as in optax. For a run of known length pass ``decay_steps`` (the annealed
  band). Pass the batch to ``update``:

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

  Under ``optax.inject_hyperparams`` use :func:`kstep.inject_hyperparams`, which lists the
  static arguments (``apply_fn``, a callable ``loss``, ``num_probes``, ...) for you.

  Raises:
    ValueError: at construction, naming the argument that is out of range.
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
  parts.append(
      scale_by_k_control(
          learning_rate, apply_fn=apply_fn, loss=loss, batch_size=batch_size, target=target,
          output_norm=output_norm, momentum=momentum, nesterov=nesterov, every=every,
          num_probes=num_probes, estimator=estimator, max_sharpness_ratio=max_sharpness_ratio,
          sharpness_iters=sharpness_iters, refresh_every=refresh_every,
          probe_batch_size=probe_batch_size,
          decay_steps=decay_steps, band_decay=band_decay,
          smoothing=smoothing, max_change=max_change, max_scale=max_scale,
          trace_floor=trace_floor, seed=seed, axis_name=axis_name, probe_scope=probe_scope,
      )
  )
  return optax.chain(*parts)
