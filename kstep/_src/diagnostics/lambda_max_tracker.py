"""Tracks λ_max, the largest algebraic eigenvalue of the training loss's Hessian (EoS)."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kstep._src import arguments, estimators, k_estimate, periodic
from kstep._src.diagnostics import common
from kstep._src.estimators import AxisName
from kstep._src.noise_kernel import curvature_edge
from kstep._src.preconditioners import Preconditioner

Array = jax.Array
PyTree = Any
ScalarOrSchedule = optax.ScalarOrSchedule


class TrackLambdaMaxState(NamedTuple):
  """State of :func:`track_lambda_max`.

  Attributes:
    count: updates seen so far (int32).
    key: PRNG key of the random start vectors (folded with ``count``), made in ``init``.
    eigenvector: unit-norm float32 pytree shaped (and sharded) like params, the last top
      eigenvector (the warm start of the next solve).
    lambda_max: the largest algebraic Hessian eigenvalue at the last valid measurement (NaN
      before any).
    lambda_max_residual: ``‖H v − λ v‖`` of the last valid measurement (NaN before any).
    lambda_max_iters: Hessian-vector products the last solve spent (the residual check excluded).
    lambda_max_edge_ratio: ``η · lambda_max / (2(1 + μ))``, η the learning rate at this update
      and μ the heavy-ball momentum: 1 on the quadratic stability edge of gradient descent with
      momentum. NaN without a ``learning_rate`` or before the first valid measurement.
    lambda_max_num_measurements: valid measurements so far.
    lambda_max_num_skipped: measurements dropped as NaN/Inf.
  """

  count: Array
  key: Array
  eigenvector: PyTree
  lambda_max: Array
  lambda_max_residual: Array
  lambda_max_iters: Array
  lambda_max_edge_ratio: Array
  lambda_max_num_measurements: Array
  lambda_max_num_skipped: Array

  STATS_FIELDS = (
      "lambda_max", "lambda_max_residual", "lambda_max_iters", "lambda_max_edge_ratio",
      "lambda_max_num_measurements", "lambda_max_num_skipped",
  )


def track_lambda_max(
    loss_fn: Callable[[PyTree, Any], Array],
    *,
    every: int,
    learning_rate: ScalarOrSchedule | None = None,
    momentum: float = 0.0,
    num_iters: int = 20,
    method: str = "lanczos",
    warm_start: bool = True,
    tol: float = 1e-3,
    seed: int | Array = 0,
    axis_name: AxisName = None,
    preconditioner: Preconditioner | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Records λ_max, the largest algebraic eigenvalue of the Hessian ``∇²_θ loss_fn(θ, batch)``.

  The sharpness of Cohen et al. (2021): full-batch gradient descent with step η drives λ_max up
  to ``2/η`` (progressive sharpening) and then hovers there (the Edge of Stability); with
  heavy-ball momentum μ the edge is ``2(1 + μ)/η`` (the stability limit of momentum on a
  quadratic, where Cohen et al. also find λ_max). Under mini-batch SGD λ_max stays below its edge
  (Andreyev & Beneventano, EoSS) while Batch Sharpness (:func:`track_batch_sharpness`) takes its
  place. Given ``learning_rate``, ``lambda_max_edge_ratio = η · λ_max / (2(1 + μ))`` reads 1 on
  the edge. Every ``every`` updates,
  :func:`kstep.lambda_max` solves for the top eigenpair with Lanczos (full reorthogonalisation)
  or shifted power iteration on Hessian-vector products (forward-over-reverse, at a float32 copy
  of params), started from the previous eigenvector when ``warm_start``: after a small
  parameter update it is nearly converged already, and the solve stops early on the residual
  ``‖H v − λ v‖ ≤ tol·|λ|``.

  With a ``preconditioner`` (:func:`kstep.adam_preconditioner`) it records ``λ_max(P⁻¹H)``, the
  top eigenvalue of ``P^{-1/2} H P^{-1/2}`` with P read from the preconditioner's state, against
  the edge ``2(1 + β₁)/(1 − β₁)`` for an EMA momentum (Cohen et al. 2022; ``docs/design.md``,
  "Adaptive optimizers"); it then *is* that link of the chain (``optax.chain(track_lambda_max(
  ..., preconditioner=kstep.adam_preconditioner()), optax.scale_by_learning_rate(η))`` is Adam).

  The batch: the keyword ``measure_batch=`` of ``update`` if given (e.g. a fixed subset of the
  training set, for a full-batch λ_max under SGD), else ``batch=`` (the current batch; the
  λ_max of that mini-batch's Hessian). The batch stays fixed during one solve.

  ``lambda_max`` and ``lambda_max_residual`` read NaN until the first valid measurement (a
  measurement that comes out NaN/Inf is skipped and counted in ``lambda_max_num_skipped``).

  Cost per measurement: at most ``num_iters + 1`` Hessian-vector products (each about the cost
  of two to three gradients), fewer with a warm start; memory ``num_iters × P`` floats for the
  Lanczos basis plus one float32 copy of params in the state.

  Args:
    loss_fn: scalar loss ``loss_fn(params, batch)``.
    every: measure on updates 0, ``every``, ``2·every``, …
    learning_rate: η, a float or an optax schedule of the update count (the step the optimizer
      takes), for ``lambda_max_edge_ratio``; ``None`` leaves that ratio NaN.
    momentum: μ in [0, 1), the optimizer's heavy-ball momentum in optax's convention
      (``optax.sgd(η, momentum=μ)``: ``t ← g + μ t``, ``θ ← θ − η t``); 0 for plain SGD.
    num_iters: the most Hessian-vector products per solve.
    method: ``"lanczos"`` or ``"power"`` (see :func:`kstep.lambda_max`).
    warm_start: start each solve from the previous eigenvector (else from a fresh random one).
    tol: relative residual at which a solve stops. The eigenvalue's error is of order
      ``residual² / gap``, far below ``tol``.
    seed: int seed (or PRNG key) of the random start vectors; the key is made in ``init``.
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split over (λ_max of the
      global batch's loss; one all-reduce of P floats per product). Not needed under ``jax.jit``
      with sharded arrays.
    preconditioner: a :class:`kstep.Preconditioner` to run and measure through, or ``None``
      (pass-through; the Hessian itself).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`TrackLambdaMaxState` (inside
    a ``PreconditionedTrackerState`` with a ``preconditioner``);
    ``kstep.stats`` reports ``lambda_max``, ``lambda_max_residual``, ``lambda_max_iters``,
    ``lambda_max_edge_ratio``, ``lambda_max_num_measurements`` and ``lambda_max_num_skipped``.

  Raises:
    ValueError: at construction, naming the argument that is out of range; in ``init`` and
      ``update`` for complex ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, kstep
    >>> loss_fn = lambda p, batch: 0.5 * jnp.sum(batch * p**2)  # Hessian diag(batch)
    >>> params, batch = jnp.ones(3), jnp.array([1.0, 4.0, 2.0])
    >>> opt = optax.chain(
    ...     optax.sgd(0.1, momentum=0.9),
    ...     kstep.track_lambda_max(loss_fn, every=1, learning_rate=0.1, momentum=0.9))
    >>> state = opt.init(params)
    >>> float(kstep.stats(state)["lambda_max"])  # no measurement yet
    nan
    >>> grads = jax.grad(loss_fn)(params, batch)
    >>> updates, state = opt.update(grads, state, params, batch=batch)
    >>> s = kstep.stats(state)
    >>> round(float(s["lambda_max"]), 4), round(float(s["lambda_max_edge_ratio"]), 4)  # 0.4/3.8
    (4.0, 0.1053)
  """
  arguments.check_callable("loss_fn", loss_fn, "loss_fn(params, batch) -> scalar")
  arguments.check_positive_int("every", every)
  num_iters = arguments.check_static_int(
      "num_iters", num_iters, "sets the size of the Lanczos basis"
  )
  if method not in estimators.EIGEN_METHODS:
    raise ValueError(f"`method` must be one of {estimators.EIGEN_METHODS}; got {method!r}.")
  if not isinstance(warm_start, bool):
    raise ValueError(f"`warm_start` must be a bool; got {warm_start!r}.")
  arguments.check_positive_float("tol", tol)
  arguments.check_learning_rate(learning_rate, optional=True)
  arguments.check_momentum(momentum)
  arguments.check_seed(seed)  # the key itself is made in init, with the state
  every = arguments.static_or_traced_int(every)
  momentum, ema = common.momentum_and_ema(preconditioner, momentum)

  def init_fn(params: PyTree) -> TrackLambdaMaxState:
    arguments.check_real_params(params, "track_lambda_max")
    key = arguments.prng_key(seed)
    return TrackLambdaMaxState(
        count=common.izero(), key=key,
        eigenvector=estimators.random_unit(key, params),  # sharded like params
        lambda_max=common.nan(), lambda_max_residual=common.nan(),
        lambda_max_iters=common.izero(), lambda_max_edge_ratio=common.nan(),
        lambda_max_num_measurements=common.izero(), lambda_max_num_skipped=common.izero(),
    )

  def measure(state: TrackLambdaMaxState, params: PyTree, batch: Any,
              inv_sqrt) -> TrackLambdaMaxState:
    key = jax.random.fold_in(state.key, state.count)
    start = state.eigenvector if warm_start else None  # None: a random start drawn from `key`
    fn = loss_fn
    if inv_sqrt is not None:  # P^{-1/2} H P^{-1/2}: the Hessian in φ = P^{1/2} θ
      fn, params = k_estimate.in_preconditioned_coordinates(loss_fn, params, inv_sqrt())
    res = estimators.lambda_max(
        fn, params, batch, num_iters=num_iters, method=method, init=start, key=key, tol=tol,
        axis_name=axis_name,
    )
    finite = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(res.eigenvector)]
    vec_ok = jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)
    valid = jnp.isfinite(res.value) & jnp.isfinite(res.residual) & vec_ok
    new = state._replace(
        eigenvector=common.same_types(res.eigenvector, state.eigenvector), lambda_max=res.value,
        lambda_max_residual=res.residual, lambda_max_iters=res.num_iters,
    )
    return common.accept(valid, new, state, "lambda_max")

  def update_fn(updates, state: TrackLambdaMaxState, params, extra_args, inv_sqrt):
    common.check_params(params, "track_lambda_max")
    arguments.check_real_params(params, "track_lambda_max")
    batch = common.get_batch(extra_args, "track_lambda_max", allow_measure_batch=True)
    new_state = periodic.when_due(state.count, every, updates,
                                  lambda s: measure(s, params, batch, inv_sqrt), state)
    edge = common.edge_ratio(
        learning_rate, state.count, new_state.lambda_max, curvature_edge(momentum, ema=ema)
    )
    return periodic.release(updates, new_state.lambda_max), new_state._replace(
        count=optax.safe_increment(state.count), lambda_max_edge_ratio=edge
    )

  return common.with_preconditioner(preconditioner, init_fn, update_fn)
