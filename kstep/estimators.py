"""Curvature estimators: Gauss–Newton / NTK traces, Hessian-vector products, λ_max, Batch Sharpness.

All functions are pure and jit-compatible, take an explicit PRNG key where they sample, accept
params of any pytree structure and any float dtype, and accumulate in float32 (bf16/f16 params give
float32 estimates). Per-example work is chunked with ``jax.lax.map(..., batch_size=chunk_size)`` so
memory stays bounded.

Shapes: ``apply_fn(params, batch)`` returns outputs of shape ``(B, C)`` or ``(B,)``; every leaf of
``batch`` has the examples on its leading axis (needed only for ``method="exact"``, which evaluates
the model one example at a time).

Data parallelism. Under ``jax.jit`` with the batch sharded over a mesh (``NamedSharding``; params
replicated or sharded) nothing changes: probes are drawn at the global batch's shape and the
compiler inserts the reductions. Inside ``jax.shard_map`` or ``jax.pmap`` each device sees its own
shard: pass ``axis_name`` (the mapped axis, or a tuple of axes, the batch is split over) and the
estimators combine the devices with collectives over it. Params must then be the same on every
device along ``axis_name``, shards must have equal size, and ``loss_fn`` returns the mean loss of
the local shard (the global loss is the mean over devices). With the same key, the estimate on a
sharded batch equals the single-device estimate on the whole batch (up to float rounding).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Hashable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kstep import losses as losses_lib

Array = jax.Array
PyTree = Any
ApplyFn = Callable[[PyTree, Any], Array]
LossFn = Callable[[PyTree, Any], Array]
AxisName = Hashable | tuple[Hashable, ...] | None

METHODS = ("hutchinson", "exact")
PROBE_SCOPES = ("global", "per_shard")


class TraceEstimate(NamedTuple):
  """A trace estimate and its standard error.

  Attributes:
    value: the estimate (float32 scalar).
    stderr: the standard error of ``value`` from the spread of the probes
      (``std(ddof=1) / sqrt(num_probes)``); NaN when ``num_probes == 1`` (one probe carries no
      information on its own spread) and 0 for ``method="exact"``.
  """

  value: Array
  stderr: Array


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


class BatchSharpness(NamedTuple):
  """Batch Sharpness (Andreyev & Beneventano, Definition 1) over M batches.

  Attributes:
    value: the requested reduction: ``"ratio_of_means"`` is ``mean_B[gᵀHg] / mean_B[‖g‖²]``
      (Definition 1); ``"mean_of_ratios"`` is ``mean_B[gᵀHg / ‖g‖²]`` (what the authors' code
      reports mostly).
    stderr: its standard error over the M batches (delta method for the ratio of means).
    curvature: per-batch ``g_Bᵀ H_B g_B``, shape ``(M,)``.
    grad_sq_norm: per-batch ``‖g_B‖²``, shape ``(M,)``.
  """

  value: Array
  stderr: Array
  curvature: Array
  grad_sq_norm: Array


def _f32(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _sq_norm(tree: PyTree) -> Array:
  leaves = jax.tree.leaves(tree)
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0.0))


def _vdot(a: PyTree, b: PyTree) -> Array:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return sum(
      (jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)) for x, y in pairs), jnp.float32(0.0)
  )


# ----------------------------------------------------------------------------------------------
# Collectives over the data axis (no-ops when ``axis_name`` is None).


def _psum(x: Any, axis_name: AxisName) -> Any:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmean(x: Any, axis_name: AxisName) -> Any:
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def _local(params: PyTree, axis_name: AxisName) -> PyTree:
  """Params marked as varying over ``axis_name``, so derivatives in them stay per device.

  Inside ``shard_map`` (with its default ``check_vma=True``) the derivative of a local loss in
  replicated params is summed over the devices implicitly; with ``check_vma=False`` or ``pmap`` it
  is not. Casting first makes every mode return the local derivative, which is then reduced
  explicitly.
  """
  if axis_name is None:
    return params
  cast = getattr(jax.lax, "pcast", None)
  if cast is not None:
    return jax.tree.map(lambda x: cast(x, axis_name, to="varying"), params)
  pvary = getattr(jax.lax, "pvary", None)  # JAX 0.6–0.7
  return params if pvary is None else jax.tree.map(lambda x: pvary(x, axis_name), params)


def _global_rows(b: int, axis_name: AxisName) -> tuple[int, Any]:
  """``(B_total, first row of this shard)`` of a batch split evenly over ``axis_name``."""
  if axis_name is None:
    return b, 0
  return b * jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name) * b


def mean_and_stderr(samples: Array) -> TraceEstimate:
  """Mean of i.i.d. samples along axis 0 and its standard error (NaN for a single sample)."""
  n = samples.shape[0]
  mean = jnp.mean(samples)
  if n == 1:
    return TraceEstimate(mean, jnp.full((), jnp.nan, jnp.float32))
  return TraceEstimate(mean, jnp.std(samples, ddof=1) / jnp.sqrt(jnp.float32(n)))


def check_probe_scope(probe_scope: str, axis_name: AxisName) -> None:
  """Raises ValueError unless ``probe_scope`` is known and, if ``"per_shard"``, has an axis."""
  if probe_scope not in PROBE_SCOPES:
    raise ValueError(f"`probe_scope` must be one of {PROBE_SCOPES}; got {probe_scope!r}.")
  if probe_scope == "per_shard" and axis_name is None:
    raise ValueError(
        '`probe_scope="per_shard"` needs `axis_name` (the shard_map/pmap axis the batch is split '
        "over); under jax.jit with sharded arrays the estimate is always the global one."
    )


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")


def _check_positive_int(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


def _as_batch(example: Any) -> Any:
  """One example (leaves without the batch axis) as a batch of one."""
  return jax.tree.map(lambda x: x[None], example)


def _per_example_ntk(apply_fn: ApplyFn, params: PyTree, batch: Any, chunk_size: int) -> Array:
  """Per-example output kernels ``J_i J_iᵀ`` (shape ``(B, C, C)``, float32)."""

  def one(example: Any) -> Array:
    f = lambda p: apply_fn(p, _as_batch(example)).reshape(-1)
    jac = jax.jacrev(f)(params)  # leaves (C, *leaf_shape)
    flat = jnp.concatenate(
        [x.reshape(x.shape[0], -1).astype(jnp.float32) for x in jax.tree.leaves(jac)], axis=1
    )
    return flat @ flat.T

  return jax.lax.map(one, batch, batch_size=chunk_size)


def gauss_newton_trace(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Any,
    *,
    loss: str | losses_lib.PerExampleLoss = "mse",
    key: Array | None = None,
    num_probes: int = 1,
    method: str = "hutchinson",
    chunk_size: int = 32,
    axis_name: AxisName = None,
    probe_scope: str = "global",
) -> TraceEstimate:
  r"""Mean over the batch of ``tr(J_iᵀ H_i J_i)``: the Gauss–Newton trace (K paper eq. 87/130).

  ``T = (1/B) Σ_i tr(J_iᵀ H_i J_i)`` with ``J_i`` the C×P Jacobian of the outputs of example i and
  ``H_i`` the Hessian of its loss in the outputs. For ``loss="mse"`` (ℓ = ½‖f − y‖²) this is the
  NTK trace ``tr(Θ̂)`` with ``Θ̂ = J Jᵀ / B``.

  Methods:
    * ``"hutchinson"``, named losses: per probe, ``u ~ losses`` sampler with ``E[u_i u_iᵀ] = H_i``
      (Rademacher for MSE, sampled labels ``u_i = p_i − e_ŷ`` for the cross-entropies), and the
      sample ``‖Σ_i J_iᵀ u_i‖² / B``: one forward (shared) and one VJP per probe; unbiased.
    * ``"hutchinson"``, callable loss: per probe a Rademacher ``z`` in parameter space and the
      sample ``Σ_i (J_i z)ᵀ H_i (J_i z) / B`` (one JVP and one output-space Hessian product).
    * ``"exact"``: per-example Jacobians (``jax.lax.map`` in chunks of ``chunk_size`` examples),
      ``Σ_i tr(H_i J_i J_iᵀ) / B``; stderr 0.

  Sharded batches (``axis_name``, inside ``shard_map``/``pmap``; see the module docstring), B the
  global batch. ``probe_scope="global"`` (default) draws each probe for the whole batch and keeps
  this device's rows, sums ``Σ_i J_iᵀ u_i`` over the devices (one all-reduce of P floats per
  probe) and so returns the single-device estimate. ``probe_scope="per_shard"`` (named losses;
  for the others it changes nothing) draws independent probes per device and sums the squared
  norms ``Σ_d ‖Σ_{i∈d} J_iᵀ u_i‖²`` instead (one all-reduce of a scalar per probe): also
  unbiased, since it only drops the zero-mean cross terms between devices, and therefore of
  lower variance, but a different number from the single-device one.

  Args:
    apply_fn: ``apply_fn(params, batch)`` -> outputs ``(B, C)`` or ``(B,)``.
    params: any pytree of float arrays.
    batch: the inputs (and anything else ``apply_fn``/``loss`` read).
    loss: ``"mse"``, ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or a callable
      ``loss(outputs, batch) -> (B,)`` per-example losses (outputs in the model's own shape).
    key: PRNG key for the probes (required for ``"hutchinson"``; the same on every device).
    num_probes: number of independent probes averaged.
    method: ``"hutchinson"`` or ``"exact"``.
    chunk_size: examples (exact) or probes (hutchinson) processed at once.
    axis_name: the mapped axis (or tuple of axes) the batch is split over, inside
      ``shard_map``/``pmap``; ``None`` otherwise (also under ``jit`` with sharded arrays).
    probe_scope: ``"global"`` or ``"per_shard"`` (only with ``axis_name``).

  Returns:
    ``TraceEstimate(value, stderr)`` in float32, the same on every device.

  Raises:
    ValueError: an argument is out of range (named in the message).
  """
  _check_method(method)
  _check_positive_int("num_probes", num_probes)
  _check_positive_int("chunk_size", chunk_size)
  check_probe_scope(probe_scope, axis_name)
  spec = losses_lib.resolve_loss(loss)
  params = _local(params, axis_name)
  outputs, vjp_fn = jax.vjp(lambda p: apply_fn(p, batch), params)
  out_shape, out_dtype = outputs.shape, outputs.dtype
  b = out_shape[0]
  b_total, first_row = _global_rows(b, axis_name)
  out2d = outputs.reshape(b, -1)
  spec = spec.for_output_shape(out_shape)

  if method == "exact":
    kernels = _per_example_ntk(apply_fn, params, batch, chunk_size)
    h = spec.hessian(out2d, batch)
    value = _psum(jnp.sum(h * kernels), axis_name) / b_total  # Σ_i tr(H_i K_i), both symmetric
    return TraceEstimate(value.astype(jnp.float32), jnp.zeros((), jnp.float32))

  if key is None:
    raise ValueError('`key` is required for method="hutchinson".')
  keys = jax.random.split(key, num_probes)

  if spec.noise is not None:
    per_shard = probe_scope == "per_shard"

    def probe(k: Array) -> Array:
      if per_shard:
        noise = spec.noise(jax.random.fold_in(k, jax.lax.axis_index(axis_name)), out2d.shape)
      else:
        noise = spec.noise(k, (b_total, out2d.shape[1]))
        if axis_name is not None:
          noise = jax.lax.dynamic_slice_in_dim(noise, first_row, b, axis=0)
      u = spec.probe(noise, out2d, batch)
      (g,) = vjp_fn(u.reshape(out_shape).astype(out_dtype))
      if per_shard:
        return _psum(_sq_norm(g), axis_name) / b_total
      return _sq_norm(_psum(_f32(g), axis_name)) / b_total

  else:
    apply_p = lambda p: apply_fn(p, batch).reshape(b, -1)
    flat_params, unravel = ravel_pytree(params)

    def probe(k: Array) -> Array:
      # One draw over all P parameters (a draw per leaf would put one RNG per leaf in the
      # compiled program, and compile time grows with the number of leaves).
      z = unravel(jax.random.rademacher(k, flat_params.shape, dtype=flat_params.dtype))
      w = jax.jvp(apply_p, (params,), (z,))[1].astype(jnp.float32)
      return _psum(jnp.sum(w * spec.gnvp(out2d, batch, w)), axis_name) / b_total

  samples = jax.lax.map(probe, keys, batch_size=min(chunk_size, num_probes))
  return mean_and_stderr(samples)


def ntk_trace(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Any,
    *,
    key: Array | None = None,
    num_probes: int = 1,
    method: str = "hutchinson",
    chunk_size: int = 32,
    axis_name: AxisName = None,
    probe_scope: str = "global",
) -> TraceEstimate:
  """Mean over the batch of ``Σ_c ‖∇_θ f_c(x_i)‖²``: ``tr(Θ̂)`` with ``Θ̂ = J Jᵀ / B`` (eq. 11).

  The MSE case of :func:`gauss_newton_trace` (Rademacher probes over all B·C outputs).
  """
  return gauss_newton_trace(
      apply_fn, params, batch, loss="mse", key=key, num_probes=num_probes, method=method,
      chunk_size=chunk_size, axis_name=axis_name, probe_scope=probe_scope,
  )


def empirical_ntk(apply_fn: ApplyFn, params: PyTree, batch: Any, *, chunk_size: int = 32) -> Array:
  """The N×N empirical NTK ``Θ̂ = J Jᵀ / N`` of a scalar-output model (K paper, §2.1).

  For the exact formulas (:func:`kstep.k_exact`, :func:`kstep.second_moment_growth`) at small N.

  Raises:
    ValueError: the model has more than one output per example.
  """
  outputs = jax.eval_shape(lambda p: apply_fn(p, batch), params)
  n = outputs.shape[0]
  if outputs.size != n:
    raise ValueError(
        f"empirical_ntk needs one output per example; apply_fn returns shape {outputs.shape}."
    )

  def grad_one(example: Any) -> Array:
    g = jax.grad(lambda p: apply_fn(p, _as_batch(example)).reshape(()))(params)
    return ravel_pytree(_f32(g))[0]

  jac = jax.lax.map(grad_one, batch, batch_size=chunk_size)  # (N, P)
  return jac @ jac.T / n


def hvp(
    loss_fn: LossFn, params: PyTree, batch: Any, v: PyTree, *, axis_name: AxisName = None
) -> PyTree:
  """Hessian-vector product ``∇²_θ loss_fn(params, batch) · v``, forward-over-reverse.

  With ``axis_name``, the Hessian of the mean of the devices' losses (one all-reduce of P floats).
  """
  primal, tangent = _local((params, v), axis_name)
  local = jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (primal,), (tangent,))[1]
  return _pmean(local, axis_name)


def _grad(loss_fn: LossFn, params: PyTree, batch: Any, *, axis_name: AxisName = None) -> PyTree:
  """Gradient of ``loss_fn(params, batch)``; with ``axis_name``, of the mean over the devices."""
  return _pmean(jax.grad(loss_fn)(_local(params, axis_name), batch), axis_name)


def gauss_newton_vp(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Any,
    v: PyTree,
    *,
    loss: Any = "mse",
    axis_name: AxisName = None,
) -> PyTree:
  """Gauss–Newton-vector product ``(1/B) Σ_i J_iᵀ H_i J_i v`` (one JVP, one VJP).

  With ``axis_name``, B and the sum run over the global batch (one all-reduce of P floats).
  """
  spec = losses_lib.resolve_loss(loss)
  params, v = _local((params, v), axis_name)
  f = lambda p: apply_fn(p, batch)
  outputs, jv = jax.jvp(f, (params,), (v,))
  b = outputs.shape[0]
  b_total, _ = _global_rows(b, axis_name)
  spec = spec.for_output_shape(outputs.shape)
  hjv = spec.gnvp(outputs.reshape(b, -1), batch, jv.reshape(b, -1).astype(jnp.float32))
  _, vjp_fn = jax.vjp(f, params)
  (out,) = vjp_fn((hjv / b_total).reshape(outputs.shape).astype(outputs.dtype))
  return _psum(out, axis_name)


def _scale(a: Array, x: PyTree) -> PyTree:
  return jax.tree.map(lambda xi: a * xi, x)


def _sub(x: PyTree, y: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, x, y)


def _where(cond: Array, x: PyTree, y: PyTree) -> PyTree:
  return jax.tree.map(lambda xi, yi: jnp.where(cond, xi, yi), x, y)


def _norm(x: PyTree) -> Array:
  return jnp.sqrt(_sq_norm(x))


def _unit(x: PyTree) -> tuple[PyTree, Array]:
  """``(x / ‖x‖, ‖x‖)``, with ``x`` itself returned where ``‖x‖ = 0``."""
  n = _norm(x)
  return _scale(jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 1.0), x), n


def _ones_unit(like: PyTree) -> PyTree:
  size = sum(x.size for x in jax.tree.leaves(like))
  return jax.tree.map(lambda x: jnp.full(x.shape, 1.0 / size**0.5, jnp.float32), like)


# Vectors in the eigensolvers are float32 pytrees shaped like params (not one flat vector): each
# leaf keeps the layout of its parameter, and no product concatenates or splits the whole vector,
# so under jit with sharded (e.g. FSDP) params the compiler is free to shard them like the params.


def random_unit(key: Array, like: PyTree) -> PyTree:
  """A random unit vector, float32, shaped like ``like`` (one normal draw of size P)."""
  flat, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), like))
  return _unit(unravel(jax.random.normal(key, flat.shape, jnp.float32)))[0]


def _initial_vector(init: PyTree | None, key: Array | None, p32: PyTree) -> PyTree:
  if init is None:
    init = random_unit(jax.random.PRNGKey(0) if key is None else key, p32)
  v0, norm = _unit(_f32(init))
  # A zero start (e.g. the eigenvector of an all-zero Hessian) falls back to a fixed direction.
  return _where(norm > 0, v0, _ones_unit(v0))


def _lanczos(matvec: Callable[[PyTree], PyTree], v0: PyTree, max_iters: int, tol: float):
  """Lanczos with full reorthogonalisation; stops when the Ritz residual ≤ tol·|θ|.

  Returns the top Ritz vector (unit norm) and the number of products used. The basis is a pytree
  whose leaves carry the m Lanczos vectors on a leading axis.
  """
  m = max_iters
  tiny = jnp.finfo(jnp.float32).tiny
  idx = jnp.arange(m)

  def coefficients(basis, w):  # (m,): ⟨basis_j, w⟩
    return sum(
        jnp.tensordot(bl, wl, axes=wl.ndim)
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
    a = _vdot(w, v)
    w = jax.tree.map(lambda wl, vl, pl: wl - a * vl - beta_prev * pl, w, v, v_prev)
    w = _sub(w, combine(coefficients(basis, w), basis))
    w = _sub(w, combine(coefficients(basis, w), basis))
    b = _norm(w)
    alphas = alphas.at[k].set(a)
    betas = betas.at[k].set(b)
    theta, s = ritz(alphas, betas, k)
    scale = jnp.maximum(jnp.abs(theta), jnp.max(jnp.abs(alphas)))
    converged = jnp.abs(b * s[k]) <= tol * jnp.maximum(jnp.abs(theta), tiny)
    breakdown = b <= 1e-6 * jnp.maximum(scale, tiny)
    v_next = _scale(jnp.where(breakdown, 0.0, 1.0 / jnp.where(breakdown, 1.0, b)), w)
    return k + 1, basis, alphas, betas, v_next, v, b, jnp.logical_or(converged, breakdown)

  zeros = jax.tree.map(jnp.zeros_like, v0)
  init = (
      jnp.int32(0), jax.tree.map(lambda x: jnp.zeros((m,) + x.shape, jnp.float32), v0),
      jnp.zeros((m,), jnp.float32), jnp.zeros((m,), jnp.float32), v0, zeros, jnp.float32(0.0),
      jnp.bool_(False),
  )
  k, basis, alphas, betas, *_ = jax.lax.while_loop(cond, body, init)
  _, s = ritz(alphas, betas, k - 1)
  y, _ = _unit(combine(s, basis))
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
    theta = _vdot(v, w)
    done = _norm(_sub(w, _scale(theta, v))) <= tol * jnp.maximum(jnp.abs(theta), tiny)
    z, nz = _unit(_sub(w, _scale(shift, v)))
    v_next = _where(nz > 0, z, v)
    return k + 1, _where(done, v, v_next), theta, jnp.logical_or(done, nz == 0)

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
        return _unit(_sub(x, _scale(_vdot(v1, x), v1)))

      w, nw = away_from_v1(v0)
      w_alt, nw_alt = away_from_v1(_ones_unit(v0))
      use_alt = nw < 1e-3
      w, nw = _where(use_alt, w_alt, w), jnp.where(use_alt, nw_alt, nw)
      start = _where(nw > 0, w, v1)
      v2, _, k2 = _power(matvec, start, theta1, num_iters - k1, tol)
      return v2, k1 + k2

    y, used = jax.lax.cond(theta1 < 0, shifted, lambda _: (v1, k1), None)
  else:
    raise ValueError(f'`method` must be "lanczos" or "power"; got {method!r}.')
  hy = matvec(y)
  theta = _vdot(y, hy)
  residual = _norm(_sub(hy, _scale(theta, y)))
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
    ``LambdaMax(value, eigenvector, residual, num_iters)``.
  """
  _check_positive_int("num_iters", num_iters)
  p32 = _f32(params)
  matvec = lambda x: _f32(hvp(loss_fn, p32, batch, x, axis_name=axis_name))
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
  """
  _check_positive_int("num_iters", num_iters)
  p32 = _f32(params)
  spec = losses_lib.resolve_loss(loss)
  matvec = lambda x: _f32(
      gauss_newton_vp(apply_fn, p32, batch, x, loss=spec, axis_name=axis_name)
  )
  v0 = _initial_vector(init, key, p32)
  return _top_eigenpair(matvec, v0, num_iters=num_iters, method=method, tol=tol)


def batch_curvature(
    loss_fn: LossFn, params: PyTree, batch: Any, *, axis_name: AxisName = None
) -> tuple[Array, Array]:
  """``(g_Bᵀ H_B g_B, ‖g_B‖²)`` for one batch: one gradient and one HVP, in float32.

  With ``axis_name`` the batch is the union of the devices' shards (two all-reduces of P floats).
  """
  p32 = _f32(params)
  g = _grad(loss_fn, p32, batch, axis_name=axis_name)
  hg = hvp(loss_fn, p32, batch, g, axis_name=axis_name)
  return _vdot(g, hg), _sq_norm(g)


def ratio_of_means(num: Array, den: Array) -> tuple[Array, Array]:
  """``mean(num)/mean(den)`` and its delta-method standard error (0/0 gives 0)."""
  m = num.shape[0]
  mn, md = jnp.mean(num), jnp.mean(den)
  safe = jnp.where(md > 0, md, 1.0)
  r = jnp.where(md > 0, mn / safe, 0.0)
  if m == 1:
    return r, jnp.full((), jnp.nan, jnp.float32)
  resid = num - r * den
  return r, jnp.where(md > 0, jnp.std(resid, ddof=1) / jnp.sqrt(jnp.float32(m)) / safe, 0.0)


def batch_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batches: Any,
    *,
    reduction: str = "ratio_of_means",
    axis_name: AxisName = None,
) -> BatchSharpness:
  """Batch Sharpness of Andreyev & Beneventano (EoSS, Definition 1) over M stacked batches.

  ``BS = E_B[g_Bᵀ H_B g_B] / E_B[‖g_B‖²]`` (``reduction="ratio_of_means"``), or the mean of the
  per-batch ratios (``reduction="mean_of_ratios"``). ``g_B`` and ``H_B`` are the gradient and
  Hessian of ``loss_fn(params, batch_m)``; ``batches`` stacks the M batches on a leading axis.
  Cost: M gradients and M Hessian-vector products. A batch with zero gradient contributes a ratio
  of 0. With ``axis_name`` (inside ``shard_map``/``pmap``) every batch is split over the devices
  along its second axis (each device holds ``(M, B/n, ...)``).
  """
  if reduction not in ("ratio_of_means", "mean_of_ratios"):
    raise ValueError(
        f'`reduction` must be "ratio_of_means" or "mean_of_ratios"; got {reduction!r}.'
    )
  num, den = jax.lax.map(
      lambda b: batch_curvature(loss_fn, params, b, axis_name=axis_name), batches
  )
  if reduction == "ratio_of_means":
    value, stderr = ratio_of_means(num, den)
  else:
    ratios = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    value, stderr = mean_and_stderr(ratios)
  return BatchSharpness(value, stderr, num, den)
