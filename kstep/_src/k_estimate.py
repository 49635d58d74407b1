"""One estimate of what K and the curvature edge need, on one batch, from one forward pass.

The K controller (:mod:`kstep._src.control`) and :func:`kstep.track_k` call :func:`estimate` every
few steps inside ``lax.cond``. From one linearisation of the model on the batch
(:func:`kstep._src.estimators.linearize`) it returns

* ``trace``: T̂, the per-example Gauss–Newton trace (NTK trace for MSE), K paper eq. 87/102;
* ``scale``: Ŝ, the kernel scale in ``K = η Ŝ / (2 α B)`` for the chosen ``output_norm``
  (``docs/design.md``, "Several outputs per example"):

  - ``"total"``: Ŝ = T̂ (every output of an example counted; eq. 102);
  - ``"per_output"``: Ŝ = T̂ / C (isotropic outputs; for MSE the edge is at K ≈ 1 in this
    norm);
  - ``"max_output"``: Ŝ = λ_max(M̂), M the C×C output kernel (:func:`kstep.output_kernel`,
    C VJPs per probe): the robust variant when one output direction dominates;

  with ``trace_floor`` ρ, ``Ŝ ← max(Ŝ, ρ · Ŝ_NTK)`` where Ŝ_NTK is the logits' NTK trace in the
  same units (one more VJP; ``"max_output"`` uses the per-output NTK scale);
* ``lambda_max`` and ``eigenvector``: with a guard vector given, the top eigenvalue of the
  Gauss–Newton matrix ``(1/B) Σ_i J_iᵀ H_i J_i`` on the batch by ``power_iters`` steps of power
  iteration warm-started from that vector (one JVP and one VJP each), read as the Rayleigh
  quotient of the last vector (one more JVP): a lower bound that converges as the warm start
  carries over between estimates.

Every product shares the one forward pass; the VJPs of stacked cotangents run one after another
(:func:`kstep._src.estimators.linearization.vjps`: on CPU cheaper than one ``vmap``ped VJP).

``"auto"`` resolves to ``"per_output"`` for ``"mse"`` and callables and to ``"total"`` for the
cross-entropies: at a uniform softmax H ≈ I/C, so the Gauss–Newton trace already carries the 1/C
(``docs/design.md``, "Several outputs per example"; the evidence: ``docs/defaults.md``).
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kstep._src import losses
from kstep._src.estimators import data_axis, linearization, output_kernels, products, traces
from kstep._src.estimators import tree_math as tm
from kstep._src.estimators.data_axis import AxisName

Array = jax.Array
PyTree = Any

OUTPUT_NORMS = ("auto", "per_output", "max_output", "total")
# The controller's defaults (kstep.scale_by_k_control, kstep.value_and_grad): rows of a warm
# estimate and its power steps.
DEFAULT_PROBE_BATCH_SIZE = 16
DEFAULT_SHARPNESS_ITERS = 1


def resolve_output_norm(output_norm: str, loss: Any) -> str:
  """``output_norm`` with ``"auto"`` resolved for ``loss`` (see the module docstring).

  Raises:
    ValueError: an unknown ``output_norm``.
  """
  if output_norm not in OUTPUT_NORMS:
    raise ValueError(f"`output_norm` must be one of {OUTPUT_NORMS}; got {output_norm!r}.")
  if output_norm != "auto":
    return output_norm
  named_ce = isinstance(loss, str) and loss.endswith("cross_entropy")
  return "total" if named_ce else "per_output"


def batch_rows(apply_fn: Callable[[PyTree, Any], Array], params: PyTree, batch: Any,
               batch_size: Any = None, *, axis_name: AxisName = None,
               out_shape: tuple[int, ...] | None = None,
               loss: losses.OutputLoss | None = None) -> tuple[int, int]:
  """``(B, C)``: B the batch size of the step, C the outputs per example.

  B is read from the outputs' static shape (global under ``axis_name``), or is the given
  ``batch_size`` when that is a multiple of it: the effective batch of n micro-batches whose
  gradients were accumulated (``optax.MultiSteps``), the rows seen being the last micro-batch.
  For a ``loss`` with ``positions`` every position is an example: ``(B, T, V)`` outputs give
  ``(B·T, V)``, and ``batch_size`` counts sequences (B), multiplied by T here.

  Raises:
    ValueError: a given ``batch_size`` that is not a multiple of the rows seen (both numbers in
      the message).
  """
  if out_shape is None:
    out_shape = jax.eval_shape(lambda p: apply_fn(p, batch), params).shape
  b, c = linearization.num_rows(apply_fn, params, batch, axis_name=axis_name,
                                out_shape=out_shape, loss=loss)
  if batch_size is None or isinstance(batch_size, jax.core.Tracer):
    return b, c
  per = losses.rows_per_example(loss, out_shape)
  b //= per
  if batch_size % b:
    raise ValueError(
        f"`batch_size` is {batch_size} but this batch has {b} examples (the leading dimension of "
        "apply_fn's outputs): K would be wrong. Give the batch's size, or under gradient "
        "accumulation the effective batch (a multiple of the micro-batch), or leave "
        "batch_size=None to read B from each batch (a short last batch then compiles once more)."
    )
  return int(batch_size) * per, c


def probe_rows(apply_fn: Callable[[PyTree, Any], Array], params: PyTree, batch: Any,
               probe_batch_size: int | None, *, axis_name: AxisName = None,
               out_shape: tuple[int, ...] | None = None) -> Any:
  """About ``probe_batch_size`` examples of ``batch``: every s-th, ``s = B // probe_batch_size``.

  T is a mean over examples, so its estimate on a sub-batch is unbiased for it, at the
  sub-batch's cost (more variance, which the smoothing averages). Strided rather than leading
  rows, so that under a sharded batch every shard keeps the same share; with ``axis_name`` each
  device strides its own rows (the single-device rows when ``s`` divides them). Leaves whose
  leading dimension is not the batch's are left whole. ``None`` or ``≥ B``: the whole batch.
  ``out_shape``: the outputs' shape when already known (saves tracing the model again).
  """
  if out_shape is None:
    out_shape = jax.eval_shape(lambda p: apply_fn(p, batch), params).shape
  local = out_shape[0]
  b_total, _ = data_axis.global_rows(local, axis_name)
  if probe_batch_size is None or probe_batch_size >= b_total:
    return batch
  stride = b_total // probe_batch_size

  def take(leaf: Any) -> Any:
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != local:
      return leaf
    return leaf[::stride]

  return jax.tree.map(take, batch)


class KEstimate(NamedTuple):
  """One estimate on one batch (float32 scalars; ``eigenvector`` a float32 pytree or None).

  Attributes:
    trace: T̂, the per-example Gauss–Newton / NTK trace over all outputs.
    scale: Ŝ, the kernel scale of K in the chosen ``output_norm`` (after the trace floor).
    lambda_max: Rayleigh quotient of the Gauss–Newton matrix after the power steps (NaN without
      a guard vector).
    eigenvector: the power iteration's next vector (None without a guard vector).
    ntk_scale: Ŝ_NTK, the floor's NTK scale in the ``output_norm``'s units, probed or given
      (NaN without a floor).
  """

  trace: Array
  scale: Array
  lambda_max: Array
  eigenvector: PyTree | None
  ntk_scale: Array


def power_update(u: PyTree, w: PyTree) -> tuple[PyTree, Array]:
  """A power step's result from the unit vector ``u`` and its product ``w = G u``: the
  normalised ``w`` (``u`` where ``w`` vanishes or is not finite) and the Rayleigh quotient
  ``uᵀ w``. A finite ``u`` gives a finite vector (‖w‖ is finite only if every entry is), so the
  controller keeps it without a pass over it to check."""
  w = tm.f32(w)
  unit, norm = tm.unit(w)
  return tm.where(jnp.isfinite(norm) & (norm > 0), unit, u), tm.vdot(u, w)


def power_steps(
    lin: linearization.LinearizedModel,
    loss: losses.OutputLoss,
    batch: Any,
    v: PyTree,
    num_iters: int,
    *,
    axis_name: AxisName = None,
) -> PyTree:
  """``num_iters`` (≥ 0, static) power steps ``u ← G u / ‖G u‖`` on the Gauss–Newton matrix
  from ``v`` (normalised first; float32): one JVP and one VJP each. A product that vanishes
  keeps its vector. Up to two steps are unrolled (a loop costs a while-loop's overhead on every
  estimate), more run in a loop."""

  def body(_, u):
    return power_update(
        u, products.linearized_gauss_newton_vp(lin, loss, batch, u, axis_name=axis_name))[0]

  u = tm.unit(tm.f32(v))[0]
  if num_iters > 2:
    return jax.lax.fori_loop(0, num_iters, body, u)
  for i in range(num_iters):
    u = body(i, u)
  return u


def gauss_newton_power(
    lin: linearization.LinearizedModel,
    loss: losses.OutputLoss,
    batch: Any,
    v: PyTree,
    num_iters: int,
    *,
    axis_name: AxisName = None,
) -> tuple[Array, PyTree]:
  """``num_iters`` (≥ 1, static) power steps on the Gauss–Newton matrix from ``v``, then the
  Rayleigh quotient of the last vector.

  Returns ``(λ, u)``: λ = ``u_nᵀ G u_n`` (a lower bound on λ_max) of the vector ``u_n`` after
  the steps. Up to two steps (the warm estimates): u = u_n and λ from one more JVP
  (:func:`kstep._src.estimators.products.gauss_newton_quadratic`); ``num_iters`` JVP+VJP pairs
  and one JVP, the same λ as ``num_iters + 1`` plain power steps that read the quotient off the
  last product (a VJP more), whose vector is one step further; the next estimate continues from
  u (``docs/defaults.md``, the guard's power steps). More steps run in a loop as those
  ``num_iters + 1`` plain steps (:func:`looped_gauss_newton_power`), the quotient read inside
  the loop and u the vector one step further: nothing of the linearisation is used after the
  loop, so XLA need not keep a copy of it.
  """
  if num_iters <= 2:
    u = power_steps(lin, loss, batch, v, num_iters, axis_name=axis_name)
    lam = products.gauss_newton_quadratic(lin, loss, batch, u, axis_name=axis_name)
    return lam, u

  return looped_gauss_newton_power(lambda b, p: lin, lin.params, loss, batch, v, num_iters,
                                   fresh=False, axis_name=axis_name)


def estimate(
    apply_fn: Callable[[PyTree, Any], Array],
    params: PyTree,
    batch: Any,
    *,
    loss: losses.OutputLoss,
    key: Array,
    output_norm: str,
    num_probes: int = 1,
    estimator: str = "hutchinson",
    trace_floor: Any = None,
    eigenvector: PyTree | None = None,
    power_iters: int = 1,
    ntk_scale: Any = None,
    axis_name: AxisName = None,
    probe_scope: str = "global",
    inv_sqrt: PyTree | None = None,
    power_batch: Any = None,
    one_at_a_time: bool = False,
    num_outputs: int | None = None,
) -> KEstimate:
  """T̂, Ŝ and (with ``eigenvector``) the Gauss–Newton λ_max on ``batch``; see the module doc.

  ``output_norm`` must be resolved (not ``"auto"``). Cost: one forward pass; ``num_probes`` VJPs
  (C per probe for ``"max_output"``); one more VJP with ``trace_floor``; ``power_iters`` JVP+VJP
  pairs and one JVP with ``eigenvector``.
  ``estimator="exact"`` replaces the probes by B per-example Jacobians. A given ``ntk_scale``
  (with ``trace_floor``; an earlier estimate's) replaces the floor's probe.
  ``inv_sqrt``: ``P^{-1/2}`` of a diagonal preconditioner P (params-shaped); every quantity is
  then that of the preconditioned model ``J P^{-1/2}`` (kernel ``J P⁻¹ Jᵀ``, Gauss–Newton
  λ_max of ``P^{-1/2} G P^{-1/2}``, the eigenvector in its coordinates). ``power_batch``: other
  rows for the power steps (a forward pass of their own). ``one_at_a_time`` (the controller's
  first estimate, many probes and power steps): each probe and each power step runs its own
  forward pass after the last one's result, in a loop, so the estimate needs the memory of one
  probe (one forward pass and its VJP) rather than of ``num_probes`` VJPs at once, at the cost
  of a forward pass per probe and per power step (``docs/controller.md``, "Costs").
  ``num_outputs``: C when already known (saves tracing the model again).
  """
  linearize = lambda rows, p: linearization.precondition(
      linearization.linearize(apply_fn, p, rows, axis_name=axis_name, loss=loss), inv_sqrt)
  c = num_outputs or linearization.num_rows(apply_fn, params, batch, axis_name=axis_name,
                                            loss=loss)[1]
  keys = jax.random.split(key, 2)
  kernel = functools.partial(
      _kernel, loss=loss, output_norm=output_norm, estimator=estimator,
      floor=trace_floor is not None and ntk_scale is None, axis_name=axis_name,
      probe_scope=probe_scope)
  if estimator == "exact" or not one_at_a_time:
    lin = linearize(batch, params)
    exact_fn, exact_params = apply_fn, params
    if estimator == "exact" and inv_sqrt is not None:
      exact_fn, exact_params = in_preconditioned_coordinates(apply_fn, params, inv_sqrt)
    parts = kernel(lin, batch, keys, num_probes, apply_fn=exact_fn, params=exact_params)
  else:
    def probe(i, acc):  # its own forward pass, after the last probe (see after())
      p, b = tm.after(acc[0], (params, batch))
      k = jax.random.split(jax.random.fold_in(keys[0], i), 2)
      return jax.tree.map(jnp.add, acc, kernel(linearize(b, p), b, k, 1))
    zero = jnp.zeros((), jnp.float32)
    zero = (zero, jnp.zeros((c, c), jnp.float32) if output_norm == "max_output" else zero, zero)
    parts = jax.tree.map(lambda x: x / num_probes,
                         jax.lax.fori_loop(0, num_probes, probe, zero))
  trace, m, ntk = parts
  if output_norm == "max_output":
    scale = jnp.linalg.eigvalsh(m)[-1]
  else:
    scale = trace / c if output_norm == "per_output" else trace
  lam = jnp.full((), jnp.nan, jnp.float32)
  if eigenvector is not None:
    rows = batch if power_batch is None else power_batch
    if one_at_a_time:
      lam, eigenvector = looped_gauss_newton_power(
          linearize, params, loss, tm.after(trace, rows), eigenvector, power_iters,
          axis_name=axis_name)
    else:
      lin = linearize(rows, params) if power_batch is not None else lin
      lam, eigenvector = gauss_newton_power(
          lin, loss, rows, eigenvector, power_iters, axis_name=axis_name)
  return assemble(trace, scale, lam, eigenvector, num_outputs=c, output_norm=output_norm,
                  trace_floor=trace_floor, ntk_trace=ntk if trace_floor is not None else None,
                  ntk_scale=ntk_scale)


def _kernel(lin: linearization.LinearizedModel, batch: Any, keys: Array, num_probes: int, *,
            loss: losses.OutputLoss, output_norm: str, estimator: str, floor: bool,
            axis_name: AxisName, probe_scope: str, apply_fn=None, params=None):
  """``(T̂, M̂, T̂_NTK)`` from ``num_probes`` probes on ``lin`` (``keys``: the trace's and the
  floor's): M̂ the output kernel for ``"max_output"`` (else 0) and T̂_NTK the floor's NTK trace
  (0 without ``floor``). ``"exact"`` reads ``apply_fn`` and ``params`` instead of probing."""
  mse = losses.resolve_loss("mse")
  common = dict(axis_name=axis_name, probe_scope=probe_scope)
  zero = jnp.zeros((), jnp.float32)
  m, ntk = zero, None
  if output_norm == "max_output":
    if estimator == "exact":
      m = output_kernels.output_kernel(
          apply_fn, params, batch, loss=loss, method="exact", **common).matrix
    else:
      m = output_kernels.linearized_output_kernel(
          lin, loss, batch, key=keys[0], num_probes=num_probes, **common).matrix
    trace = jnp.trace(m)
  elif estimator == "exact":
    trace = traces.gauss_newton_trace(
        apply_fn, params, batch, loss=loss, method="exact", **common).value
  elif floor and loss.noise is not None:
    # The trace and its floor's NTK trace: one VJP each per probe, one forward pass.
    trace, ntk = (e.value for e in traces.hutchinson_traces(
        lin, (loss, mse), batch, key=keys[0], num_probes=num_probes, **common))
  else:
    trace = traces.hutchinson_trace(
        lin, loss, batch, key=keys[0], num_probes=num_probes, **common).value
  if floor and ntk is None:
    ntk = traces.hutchinson_trace(lin, mse, batch, key=keys[1], **common).value
  return trace, m, zero if ntk is None else ntk


def looped_gauss_newton_power(
    linearize: Callable[[Any, PyTree], linearization.LinearizedModel],
    params: PyTree,
    loss: losses.OutputLoss,
    batch: Any,
    v: PyTree,
    num_iters: int,
    *,
    fresh: bool = True,
    axis_name: AxisName = None,
) -> tuple[Array, PyTree]:
  """:func:`gauss_newton_power`'s looped form: ``num_iters + 1`` plain power steps in a
  ``fori_loop``, each on ``linearize(batch, params)``; λ is the quotient read off the last
  product. ``fresh``: ``linearize`` runs the forward pass anew, on ``batch`` and ``params`` tied
  to the last step's vector (:func:`kstep._src.estimators.tree_math.after`), so that XLA
  neither hoists the linearisation out of the loop nor copies it into the loop's state. Memory:
  one step's forward, JVP and VJP; time: ``num_iters + 1`` forward passes more than with a
  fixed model (``fresh=False``, ``linearize`` returning it)."""

  def body(_, carry):
    u, _ = carry
    b, p = tm.after(tm.vdot(u, u), (batch, params)) if fresh else (batch, params)
    lin = linearize(b, p)
    return power_update(
        u, products.linearized_gauss_newton_vp(lin, loss, b, u, axis_name=axis_name))

  u = tm.unit(tm.f32(v))[0]
  u, lam = jax.lax.fori_loop(0, num_iters + 1, body, (u, jnp.zeros((), jnp.float32)))
  return lam, u


def in_preconditioned_coordinates(
    apply_fn: Callable[[PyTree, Any], Array], params: PyTree, inv_sqrt: PyTree
) -> tuple[Callable[[PyTree, Any], Array], PyTree]:
  """``apply_fn`` as a function of ``φ = P^{1/2} θ`` and the point φ (float32) for ``params``:
  its Jacobian is ``J P^{-1/2}`` (for the exact estimator's per-example Jacobians)."""
  dtypes = jax.tree.map(lambda x: x.dtype, params)
  phi = jax.tree.map(lambda x, s: x.astype(jnp.float32) / s.astype(jnp.float32), params, inv_sqrt)

  def apply_phi(p: PyTree, batch: Any) -> Array:
    theta = jax.tree.map(lambda x, s, d: (x * s.astype(jnp.float32)).astype(d), p, inv_sqrt,
                         dtypes)
    return apply_fn(theta, batch)

  return apply_phi, phi


def assemble(trace: Array, scale: Array, lambda_max: Array, eigenvector: PyTree | None, *,
             num_outputs: int, output_norm: str, trace_floor: Any = None,
             ntk_trace: Array | None = None, ntk_scale: Any = None) -> KEstimate:
  """A :class:`KEstimate` from its measured parts, the trace floor applied:
  ``Ŝ ← max(Ŝ, ρ · Ŝ_NTK)`` with ``Ŝ_NTK`` the given ``ntk_scale`` or, without one, the NTK
  trace ``ntk_trace`` in the ``output_norm``'s units (``/C`` unless ``"total"``)."""
  floor = jnp.full((), jnp.nan, jnp.float32)
  if trace_floor is not None:
    if ntk_scale is not None:
      floor = jnp.asarray(ntk_scale, jnp.float32)
    else:
      floor = (ntk_trace / (1 if output_norm == "total" else num_outputs)).astype(jnp.float32)
    scale = jnp.maximum(scale, trace_floor * floor)
  return KEstimate(jnp.asarray(trace, jnp.float32), jnp.asarray(scale, jnp.float32),
                   jnp.asarray(lambda_max, jnp.float32), eigenvector, floor)
