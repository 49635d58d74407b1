"""The top eigenpair of a curvature operator: λ_max of the Hessian or of the Gauss–Newton matrix.

Lanczos with full reorthogonalisation (default) or power iteration shifted away from a negative
dominant eigenvalue, on matrix-free products (:mod:`kstep._src.estimators.products`), warm-startable
from the previous eigenvector, stopping on the residual ``‖Hv − λv‖``.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kstep._src import arguments, losses
from kstep._src.estimators import products
from kstep._src.estimators import tree_math as tm
from kstep._src.estimators.data_axis import AxisName

Array = jax.Array
PyTree = Any
ApplyFn = Callable[[PyTree, Any], Array]
LossFn = Callable[[PyTree, Any], Array]

EIGEN_METHODS = ("lanczos", "power")


class LambdaMax(NamedTuple):
  """Result of an extreme-eigenvalue solve.

  Attributes:
    value: the largest algebraic eigenvalue (Rayleigh quotient of ``eigenvector``).
    eigenvector: unit-norm eigenvector, a float32 pytree shaped like params (pass it back as
      ``init`` to warm-start the next solve).
    residual: ``‖H v − λ v‖`` for the returned pair, from one extra matrix-vector product.
    num_iters: matrix-vector products spent before the stopping rule fired (the final residual
      product not counted).
  """

  value: Array
  eigenvector: PyTree
  residual: Array
  num_iters: Array




def _initial_vector(init: PyTree | None, key: Array | None, p32: PyTree) -> PyTree:
  if init is None:
    init = tm.random_unit(jax.random.PRNGKey(0) if key is None else key, p32)
  v0, norm = tm.unit(tm.f32(init))
  # A zero start (e.g. the eigenvector of an all-zero Hessian) falls back to a fixed direction.
  return tm.where(norm > 0, v0, tm.ones_unit(v0))


def _lanczos(matvec: Callable[[PyTree], PyTree], v0: PyTree, max_iters: int, tol: float):
  """Lanczos with full reorthogonalisation; stops when the Ritz residual ≤ tol·|θ|.

  Returns the top Ritz vector (unit norm) and the number of products used. The basis is a pytree
  whose leaves carry the m Lanczos vectors on a leading axis.
  """
  m = max_iters
  tiny = jnp.finfo(jnp.float32).tiny
  idx = jnp.arange(m)

  def coefficients(basis, w):  # (m,): ⟨basis_j, w⟩
    # A product and a sum rather than a tensordot: under an explicit mesh a contraction over
    # sharded axes needs an output sharding, a reduction does not.
    return sum(
        jnp.sum(bl * wl[None], axis=tuple(range(1, bl.ndim)))
        for bl, wl in zip(jax.tree.leaves(basis), jax.tree.leaves(w))
    )

  def combine(c, basis):  # Σ_j c_j basis_j
    return jax.tree.map(lambda bl: jnp.tensordot(c, bl, axes=1), basis)

  def ritz(alphas, betas, k):
    used = idx <= k
    amin = jnp.min(jnp.where(used, alphas, jnp.inf))
    # Unused diagonal entries sit strictly below every used one, hence below the top Ritz value.
    fill = amin - 1.0 - jnp.abs(amin)
    t = jnp.diag(jnp.where(used, alphas, fill))
    off = jnp.where(idx[:-1] < k, betas[:-1], 0.0)
    t = t + jnp.diag(off, 1) + jnp.diag(off, -1)
    evals, evecs = jnp.linalg.eigh(t)
    return evals[-1], evecs[:, -1]

  def cond(state):
    k, _, _, _, _, _, _, done = state
    return jnp.logical_and(k < m, jnp.logical_not(done))

  def body(state):
    k, basis, alphas, betas, v, v_prev, beta_prev, _ = state
    basis = jax.tree.map(lambda bl, vl: bl.at[k].set(vl), basis, v)
    w = matvec(v)
    a = tm.vdot(w, v)
    w = jax.tree.map(lambda wl, vl, pl: wl - a * vl - beta_prev * pl, w, v, v_prev)
    w = tm.sub(w, combine(coefficients(basis, w), basis))
    w = tm.sub(w, combine(coefficients(basis, w), basis))
    b = tm.norm(w)
    alphas = alphas.at[k].set(a)
    betas = betas.at[k].set(b)
    theta, s = ritz(alphas, betas, k)
    scale = jnp.maximum(jnp.abs(theta), jnp.max(jnp.abs(alphas)))
    converged = jnp.abs(b * s[k]) <= tol * jnp.maximum(jnp.abs(theta), tiny)
    breakdown = b <= 1e-6 * jnp.maximum(scale, tiny)
    v_next = tm.scale(jnp.where(breakdown, 0.0, 1.0 / jnp.where(breakdown, 1.0, b)), w)
    return k + 1, basis, alphas, betas, v_next, v, b, jnp.logical_or(converged, breakdown)

  # Like-shaped zeros: under an explicit mesh every carried vector keeps the params' sharding.
  zeros = tm.zeros_like(v0)
  init = (
      jnp.int32(0), jax.tree.map(lambda z: jnp.broadcast_to(z, (m,) + z.shape), zeros),
      jnp.zeros((m,), jnp.float32), jnp.zeros((m,), jnp.float32), v0, zeros, jnp.float32(0.0),
      jnp.bool_(False),
  )
  k, basis, alphas, betas, *_ = jax.lax.while_loop(cond, body, init)
  _, s = ritz(alphas, betas, k - 1)
  y, _ = tm.unit(combine(s, basis))
  return y, k


def _power(matvec, v0, shift, max_iters, tol):
  """Power iteration on ``H − shift·I``; stops on ‖Hv − θv‖ ≤ tol·|θ|. Returns (v, θ, iters)."""
  tiny = jnp.finfo(jnp.float32).tiny

  def cond(state):
    k, _, _, done = state
    return jnp.logical_and(k < max_iters, jnp.logical_not(done))

  def body(state):
    k, v, _, _ = state
    w = matvec(v)
    theta = tm.vdot(v, w)
    done = tm.norm(tm.sub(w, tm.scale(theta, v))) <= tol * jnp.maximum(jnp.abs(theta), tiny)
    z, nz = tm.unit(tm.sub(w, tm.scale(shift, v)))
    v_next = tm.where(nz > 0, z, v)
    return k + 1, tm.where(done, v, v_next), theta, jnp.logical_or(done, nz == 0)

  k, v, theta, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), v0, jnp.float32(0.0), jnp.bool_(False))
  )
  return v, theta, k


def _top_eigenpair(
    matvec: Callable[[PyTree], PyTree], v0: PyTree, *, num_iters: int, method: str, tol: float
) -> LambdaMax:
  if method == "lanczos":
    y, used = _lanczos(matvec, v0, num_iters, tol)
  elif method == "power":
    # Plain power iteration finds the largest |λ|. If that eigenvalue is negative, iterate on
    # H − λ_neg·I (spectrum shifted to ≥ 0) so the top of the spectrum dominates.
    v1, theta1, k1 = _power(matvec, v0, 0.0, num_iters, tol)

    def shifted(_):
      # Restart from v0 with v1 projected out: v1 is already an eigenvector of H, so started there
      # the second pass would meet its stopping rule at once and return the negative eigenvalue.
      def away_from_v1(x):
        return tm.unit(tm.sub(x, tm.scale(tm.vdot(v1, x), v1)))

      w, nw = away_from_v1(v0)
      w_alt, nw_alt = away_from_v1(tm.ones_unit(v0))
      use_alt = nw < 1e-3
      w, nw = tm.where(use_alt, w_alt, w), jnp.where(use_alt, nw_alt, nw)
      start = tm.where(nw > 0, w, v1)
      v2, _, k2 = _power(matvec, start, theta1, num_iters - k1, tol)
      return v2, k1 + k2

    y, used = jax.lax.cond(theta1 < 0, shifted, lambda _: (v1, k1), None)
  else:
    raise ValueError(f'`method` must be "lanczos" or "power"; got {method!r}.')
  hy = matvec(y)
  theta = tm.vdot(y, hy)
  residual = tm.norm(tm.sub(hy, tm.scale(theta, y)))
  return LambdaMax(theta, y, residual, used)


def lambda_max(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    num_iters: int = 20,
    method: str = "lanczos",
    init: PyTree | None = None,
    key: Array | None = None,
    tol: float = 1e-4,
    axis_name: AxisName = None,
) -> LambdaMax:
  """Largest *algebraic* eigenvalue of the Hessian of ``loss_fn(params, batch)`` in ``params``.

  Matrix-free: Hessian-vector products by forward-over-reverse (:func:`hvp`) at a float32 copy of
  ``params``; the batch stays fixed during the solve. ``"lanczos"`` (default) runs Lanczos with
  full reorthogonalisation (memory ``num_iters × P`` floats) and returns the top Ritz pair;
  ``"power"`` runs power iteration, shifted by the dominant eigenvalue when that one is negative
  (early in training the largest |λ| can be negative; plain power iteration would return it).
  Both stop when the residual estimate drops below ``tol·|λ|`` or after ``num_iters`` products.

  Args:
    loss_fn: scalar loss ``loss_fn(params, batch)``.
    num_iters: the most Hessian-vector products spent on the solve (one more checks the residual).
    method: ``"lanczos"`` or ``"power"``.
    init: start vector (a pytree shaped like params), e.g. the previous ``eigenvector`` to
      warm-start after a parameter update; random when ``None``.
    key: PRNG key for the random start (a fixed key when ``None``).
    tol: relative residual at which to stop.
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split over: the Hessian is
      that of the mean of the devices' losses (one all-reduce of P floats per product); every
      device runs the same solve.

  Returns:
    ``LambdaMax(value, eigenvector, residual, num_iters)``; the eigenvector's leaves carry the
    sharding of their params (also under an explicit mesh).

  Raises:
    ValueError: ``num_iters`` < 1, or complex ``params``.

  Example:
    >>> import jax.numpy as jnp, kstep
    >>> loss_fn = lambda p, batch: 0.5 * jnp.sum(batch * p**2)  # Hessian diag(batch)
    >>> res = kstep.lambda_max(loss_fn, jnp.ones(3), jnp.array([-5.0, 1.0, 2.0]), num_iters=3)
    >>> round(float(res.value), 4)  # the largest algebraic eigenvalue, not the largest |λ|
    2.0
  """
  arguments.check_int("num_iters", num_iters)
  arguments.check_real_params(params, "lambda_max")
  p32 = tm.f32(params)
  matvec = lambda x: tm.f32(products.hvp(loss_fn, p32, batch, x, axis_name=axis_name))
  v0 = _initial_vector(init, key, p32)
  return _top_eigenpair(matvec, v0, num_iters=num_iters, method=method, tol=tol)


def gauss_newton_lambda_max(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Any,
    *,
    loss: Any = "mse",
    num_iters: int = 20,
    method: str = "lanczos",
    init: PyTree | None = None,
    key: Array | None = None,
    tol: float = 1e-4,
    axis_name: AxisName = None,
) -> LambdaMax:
  """Top eigenvalue of the Gauss–Newton matrix ``(1/B) Σ_i J_iᵀ H_i J_i`` (PSD).

  Same interface and solvers as :func:`lambda_max`, with :func:`gauss_newton_vp` as the product.
  For ``loss="mse"`` this is ``λ_max(Θ̂)``, the full-batch EOS quantity of the K paper (§2.1).
  Complex ``params`` raise a ``ValueError``.
  """
  arguments.check_int("num_iters", num_iters)
  arguments.check_real_params(params, "gauss_newton_lambda_max")
  p32 = tm.f32(params)
  spec = losses.resolve_loss(loss)
  matvec = lambda x: tm.f32(
      products.gauss_newton_vp(apply_fn, p32, batch, x, loss=spec, axis_name=axis_name)
  )
  v0 = _initial_vector(init, key, p32)
  return _top_eigenpair(matvec, v0, num_iters=num_iters, method=method, tol=tol)
