"""Gauss–Newton and NTK traces per example (the T of K = η T / (2 α B)), and the empirical NTK.

All functions are pure and jit-compatible, take an explicit PRNG key where they sample, accept
params of any pytree structure and float dtype, and accumulate in float32. Per-example work is
chunked with ``jax.lax.map(..., batch_size=chunk_size)`` so memory stays bounded.
"""


from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kstep._src import arguments, losses
from kstep._src.estimators import data_axis, linearization, sample_stats
from kstep._src.estimators import tree_math as tm
from kstep._src.estimators.data_axis import AxisName

Array = jax.Array
PyTree = Any
ApplyFn = Callable[[PyTree, Any], Array]

METHODS = ("hutchinson", "exact")


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


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")


def _as_batch(example: Any) -> Any:
  """One example (leaves without the batch axis) as a batch of one."""
  return jax.tree.map(lambda x: x[None], example)


def per_example_ntk(apply_fn: ApplyFn, params: PyTree, batch: Any, chunk_size: int) -> Array:
  """Per-example output kernels ``J_i J_iᵀ`` (shape ``(B, C, C)``, float32)."""

  def one(example: Any) -> Array:
    f = lambda p: apply_fn(p, _as_batch(example)).reshape(-1)
    jac = jax.jacrev(f)(params)  # leaves (C, *leaf_shape)
    flat = jnp.concatenate(
        [x.reshape(x.shape[0], -1).astype(jnp.float32) for x in jax.tree.leaves(jac)], axis=1
    )
    return flat @ flat.T

  return jax.lax.map(one, batch, batch_size=chunk_size)


def exact_kernels(apply_fn: ApplyFn, params: PyTree, batch: Any, loss: losses.OutputLoss,
                  chunk_size: int, axis_name: AxisName = None):
  """For ``method="exact"``: ``(K, H, B)`` with ``K`` the per-example output kernels
  ``J_i J_iᵀ`` (``(b, C, C)``, this device's rows), ``H`` the loss's output Hessians on the same
  rows and ``B`` the global batch size. For a loss with ``positions`` the rows are positions:
  ``K`` keeps each position's diagonal block of its sequence's kernel."""
  params = data_axis.local(params, axis_name)
  outputs = apply_fn(params, batch)
  per = losses.rows_per_example(loss, outputs.shape)
  b = outputs.shape[0]
  b_total, _ = data_axis.global_rows(b, axis_name)
  spec = loss.for_output_shape(outputs.shape)
  kernels = per_example_ntk(apply_fn, params, batch, chunk_size)
  if per > 1:  # (b, T·V, T·V) -> the T diagonal (V, V) blocks of each sequence
    c = kernels.shape[-1] // per
    kernels = jnp.einsum("bpcpd->bpcd", kernels.reshape(b, per, c, per, c)).reshape(-1, c, c)
  return kernels, spec.hessian(outputs.reshape(b * per, -1), batch), b_total * per


def gauss_newton_trace(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Any,
    *,
    loss: str | losses.PerExampleLoss = "mse",
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
    apply_fn: ``apply_fn(params, batch)`` -> outputs ``(B, C)`` or ``(B,)``; ``(B, T, V)``
      logits with ``"softmax_cross_entropy"`` are ``B·T`` rows of ``V``.
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
  arguments.check_int("num_probes", num_probes)
  arguments.check_int("chunk_size", chunk_size)
  data_axis.check_probe_scope(probe_scope, axis_name)
  spec = losses.resolve_loss(loss)
  if method == "exact":
    kernels, h, b_total = exact_kernels(apply_fn, params, batch, spec, chunk_size, axis_name)
    # Σ_i tr(H_i K_i), both symmetric.
    value = data_axis.psum(jnp.sum(h * kernels), axis_name) / b_total
    return TraceEstimate(value.astype(jnp.float32), jnp.zeros((), jnp.float32))
  if key is None:
    raise ValueError('`key` is required for method="hutchinson".')
  lin = linearization.linearize(apply_fn, params, batch, axis_name=axis_name, loss=spec)
  return hutchinson_trace(
      lin, spec, batch, key=key, num_probes=num_probes, chunk_size=chunk_size,
      axis_name=axis_name, probe_scope=probe_scope,
  )


def draw_rows(noise: Callable[[Array, tuple[int, ...]], Array], key: Array,
              lin: linearization.LinearizedModel, width: int, *, axis_name: AxisName = None,
              per_shard: bool = False) -> Array:
  """This device's rows ``(b, width)`` of a noise draw.

  ``per_shard=False``: the draw for the whole batch ``(B, width)`` (the same key on every
  device), sliced to this device's rows, so a sharded estimate equals the single-device one.
  ``per_shard=True``: an independent draw per device (the key folded with the device index).
  """
  if per_shard:
    return noise(jax.random.fold_in(key, jax.lax.axis_index(axis_name)), (lin.num_rows, width))
  rows = noise(key, (lin.num_rows_total, width))
  if axis_name is None:
    return rows
  return jax.lax.dynamic_slice_in_dim(rows, lin.first_row, lin.num_rows, axis=0)


def _map_probes(probe: Callable[[Array], Array], key: Array, num_probes: int,
                chunk_size: int) -> Array:
  """``probe`` on ``num_probes`` keys split from ``key``, stacked; one probe runs without a loop
  (a loop of one costs a while-loop's overhead on every estimate)."""
  keys = jax.random.split(key, num_probes)
  if num_probes == 1:
    return probe(keys[0])[None]
  return jax.lax.map(probe, keys, batch_size=min(chunk_size, num_probes))


def hutchinson_trace(
    lin: linearization.LinearizedModel,
    loss: losses.OutputLoss,
    batch: Any,
    *,
    key: Array,
    num_probes: int = 1,
    chunk_size: int = 32,
    axis_name: AxisName = None,
    probe_scope: str = "global",
) -> TraceEstimate:
  """:func:`gauss_newton_trace` by probes on an already linearised model (no forward pass).

  Named losses: one VJP per probe (``lin.vjp`` of the sampled cotangent); callables: one JVP per
  probe (a Rademacher tangent in parameter space) and an output-space Hessian product.
  """
  spec = loss.for_output_shape(lin.out_shape)
  if spec.noise is not None:
    return hutchinson_traces(
        lin, (spec,), batch, key=key, num_probes=num_probes, chunk_size=chunk_size,
        axis_name=axis_name, probe_scope=probe_scope,
    )[0]
  b_total, out2d = lin.num_rows_total, lin.outputs
  flat_params, unravel = ravel_pytree(lin.params)

  def probe(k: Array) -> Array:
    # One draw over all P parameters (a draw per leaf would put one RNG per leaf in the
    # compiled program, and compile time grows with the number of leaves).
    z = unravel(jax.random.rademacher(k, flat_params.shape, dtype=flat_params.dtype))
    w = lin.jvp(z)
    return data_axis.psum(jnp.sum(w * spec.gnvp(out2d, batch, w)), axis_name) / b_total

  samples = _map_probes(probe, key, num_probes, chunk_size)
  return TraceEstimate(*sample_stats.mean_and_stderr(samples))


def probe_cotangents(lin: linearization.LinearizedModel, specs: tuple[losses.OutputLoss, ...],
                     batch: Any, key: Array, *, axis_name: AxisName = None,
                     per_shard: bool = False) -> Array:
  """One probe's cotangents ``(len(specs), b, C)`` (this device's rows), one per loss.

  Each loss samples its own probe (``E[u_i u_iᵀ] = H_i``; loss j uses ``key`` folded with j,
  so the losses' noises are independent). ``specs`` must be shaped for ``lin`` and have a
  ``noise``.
  """
  out2d = lin.outputs
  cotangents = []
  for j, spec in enumerate(specs):
    kj = key if j == 0 else jax.random.fold_in(key, j)
    noise = draw_rows(spec.noise, kj, lin, out2d.shape[1], axis_name=axis_name,
                      per_shard=per_shard)
    cotangents.append(spec.probe(noise, out2d, batch))
  return jnp.stack(cotangents)


def probe_samples(vjps: list[PyTree], num_rows_total: int, *, axis_name: AxisName = None,
                  per_shard: bool = False) -> Array:
  """``‖Σ_i J_iᵀ u_i‖² / B`` for each probe's VJP in ``vjps`` (a list): the trace samples,
  shape ``(len(vjps),)``. With ``per_shard`` the devices' squared norms are summed instead (see
  :func:`gauss_newton_trace`)."""
  sq = lambda tree: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))
  if per_shard:
    return data_axis.psum(jnp.stack([sq(g) for g in vjps]), axis_name) / num_rows_total
  return jnp.stack([sq(data_axis.psum(tm.f32(g), axis_name)) for g in vjps]) / num_rows_total


def hutchinson_traces(
    lin: linearization.LinearizedModel,
    specs: tuple[losses.OutputLoss, ...],
    batch: Any,
    *,
    key: Array,
    num_probes: int = 1,
    chunk_size: int = 32,
    axis_name: AxisName = None,
    probe_scope: str = "global",
) -> tuple[TraceEstimate, ...]:
  """Traces of several named losses' Gauss–Newton matrices from shared probes' VJPs.

  Per probe, each loss samples its own cotangent (:func:`probe_cotangents`) and one VJP each
  differentiates them from the one forward pass (:func:`kstep._src.estimators.linearization.vjps`):
  e.g. the Gauss–Newton trace and the trace floor's NTK trace.
  """
  specs = tuple(s.for_output_shape(lin.out_shape) for s in specs)
  per_shard = probe_scope == "per_shard"

  def probe(k: Array) -> Array:
    cotangents = probe_cotangents(lin, specs, batch, k, axis_name=axis_name, per_shard=per_shard)
    return probe_samples(linearization.vjps(lin, cotangents), lin.num_rows_total,
                         axis_name=axis_name, per_shard=per_shard)

  samples = _map_probes(probe, key, num_probes, chunk_size)  # (probes, losses)
  return tuple(TraceEstimate(*sample_stats.mean_and_stderr(samples[:, j]))
               for j in range(len(specs)))


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
    return ravel_pytree(tm.f32(g))[0]

  jac = jax.lax.map(grad_one, batch, batch_size=chunk_size)  # (N, P)
  return jac @ jac.T / n
