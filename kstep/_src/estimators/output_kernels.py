"""The C×C output kernel M: how the noise of SGD splits over the C outputs of an example.

``docs/design.md``, "Several outputs per example": mini-batches sample *examples*, so all C
outputs of a sampled example move together and the gradient noise is block diagonal in C×C
blocks. With ``J_i`` the C×P Jacobian of example i and ``H_i`` the Hessian of its loss in the
outputs,

    M = (1/B) Σ_i H_i^{1/2} J_i J_iᵀ H_i^{1/2},      tr M = T (the Gauss–Newton trace).

K per output is ``η/(2αB) · tr(M)/C`` (isotropic outputs) and at most ``η/(2αB) · λ_max(M)``
(an output direction the dynamics keep separate); for scalar outputs both are eq. 11.

Estimators:

* ``"hutchinson"``: per probe, Rademacher signs ε_i over the examples and the C cotangents
  ``u_c = (ε_i H_i^{1/2} e_c)_i``; with ``g_c = Σ_i J_iᵀ u_{c,i}`` (one VJP each, all sharing one
  forward pass), ``M̂_cd = ⟨g_c, g_d⟩ / B`` is unbiased entry by entry (the cross terms between
  examples have zero mean). Cost per probe: C VJPs and memory C × P floats.
* ``"exact"``: per-example Jacobians (B reverse passes, chunked), no randomness.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kstep._src import arguments, losses
from kstep._src.estimators import data_axis, linearization, traces
from kstep._src.estimators.data_axis import AxisName

Array = jax.Array
PyTree = Any


class OutputKernel(NamedTuple):
  """An estimate of the output kernel M.

  Attributes:
    matrix: M, shape ``(C, C)``, float32, symmetric.
    stderr: per-entry standard error from the spread of the probes, ``(C, C)``; NaN with one
      probe, 0 for ``method="exact"``.
  """

  matrix: Array
  stderr: Array


def _unit_hessian(spec: losses.OutputLoss) -> bool:
  """True for the named ``"mse"`` (H_i = I), not for a callable that happens to be called so."""
  return spec.name == "mse" and spec.per_example is None


def _sqrt_psd(h: Array) -> Array:
  """The symmetric square roots of PSD blocks ``(b, C, C)``."""
  lam, vec = jnp.linalg.eigh(h)
  root = jnp.sqrt(jnp.maximum(lam, 0.0))
  return jnp.einsum("bij,bj,bkj->bik", vec, root, vec)


def _gram(vectors: PyTree) -> Array:
  """``G_cd = ⟨v_c, v_d⟩`` for a pytree whose leaves stack C vectors on axis 0, float32."""
  total = None
  for leaf in jax.tree.leaves(vectors):
    flat = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
    gram = flat @ flat.T
    total = gram if total is None else total + gram
  return total


def linearized_output_kernel(
    lin: linearization.LinearizedModel,
    loss: losses.OutputLoss,
    batch: Any,
    *,
    key: Array,
    num_probes: int = 1,
    axis_name: AxisName = None,
    probe_scope: str = "global",
) -> OutputKernel:
  """:func:`output_kernel` by probes on an already linearised model (no forward pass)."""
  spec = loss.for_output_shape(lin.out_shape)
  c = lin.outputs.shape[1]
  # H_i^{1/2} per example; None where H_i = I ("mse").
  root = None if _unit_hessian(spec) else _sqrt_psd(spec.hessian(lin.outputs, batch))
  cols = jnp.eye(c, dtype=jnp.float32)
  per_shard = probe_scope == "per_shard"
  rademacher = lambda k, shape: jax.random.rademacher(k, shape, dtype=jnp.float32)

  def probe(k: Array) -> Array:
    eps = traces.draw_rows(rademacher, k, lin, 1, axis_name=axis_name, per_shard=per_shard)
    if root is None:
      cotangents = eps[None, :, :] * cols[:, None, :]  # [c, i, :] = ε_i e_c
    else:
      cotangents = eps[None, :, :] * jnp.transpose(root, (2, 0, 1))  # [c, i, :] = ε_i H_i^½ e_c
    g = jax.vmap(lin.vjp)(cotangents)
    if per_shard:
      return data_axis.psum(_gram(g), axis_name) / lin.num_rows_total
    return _gram(data_axis.psum(jax.tree.map(lambda x: x.astype(jnp.float32), g), axis_name)) / (
        lin.num_rows_total
    )

  samples = jax.lax.map(probe, jax.random.split(key, num_probes))
  matrix = jnp.mean(samples, axis=0)
  if num_probes == 1:
    stderr = jnp.full((c, c), jnp.nan, jnp.float32)
  else:
    stderr = jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(jnp.float32(num_probes))
  return OutputKernel((matrix + matrix.T) / 2, stderr)


def output_kernel(
    apply_fn: Callable[[PyTree, Any], Array],
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
) -> OutputKernel:
  """The output kernel ``M = (1/B) Σ_i H_i^{1/2} J_i J_iᵀ H_i^{1/2}`` (C×C) on ``batch``.

  ``tr M`` is :func:`kstep.gauss_newton_trace`; ``tr(M)/C`` and ``λ_max(M)`` are the per-output
  and max-output kernel scales of K (``output_norm`` of :func:`kstep.k_controlled_sgd`).

  Cost: ``"hutchinson"``: one forward pass and C VJPs per probe (memory C × P floats);
  ``"exact"``: B per-example Jacobians, ``chunk_size`` at a time.

  Args:
    apply_fn: ``apply_fn(params, batch)`` -> outputs ``(B, C)`` or ``(B,)``; ``(B, T, V)``
      logits with ``"softmax_cross_entropy"`` are ``B·T`` rows of ``V``.
    params: any pytree of real float arrays.
    batch: the inputs (and anything ``apply_fn``/``loss`` read).
    loss: as in :func:`kstep.gauss_newton_trace`.
    key: PRNG key of the probes (required for ``"hutchinson"``).
    num_probes: independent probes averaged.
    method: ``"hutchinson"`` or ``"exact"``.
    chunk_size: examples at a time (``"exact"``).
    axis_name: inside ``shard_map``/``pmap``, the axis the batch is split over.
    probe_scope: ``"global"`` or ``"per_shard"`` (only with ``axis_name``).

  Returns:
    ``OutputKernel(matrix, stderr)``.

  Example:
    >>> import jax, jax.numpy as jnp, kstep
    >>> params = {"w": jnp.eye(3, 2)}
    >>> batch = {"x": jnp.ones((4, 3))}
    >>> m = kstep.output_kernel(lambda p, b: b["x"] @ p["w"], params, batch, method="exact")
    >>> [[round(float(v), 3) for v in row] for row in m.matrix]  # J_i J_iᵀ = ‖x_i‖² I here
    [[3.0, 0.0], [0.0, 3.0]]

  Raises:
    ValueError: an argument is out of range (named in the message).
  """
  if method not in traces.METHODS:
    raise ValueError(f"`method` must be one of {traces.METHODS}; got {method!r}.")
  arguments.check_int("num_probes", num_probes)
  arguments.check_int("chunk_size", chunk_size)
  data_axis.check_probe_scope(probe_scope, axis_name)
  spec = losses.resolve_loss(loss)
  if method == "exact":
    kernels, h, b_total = traces.exact_kernels(apply_fn, params, batch, spec, chunk_size,
                                               axis_name)
    if not _unit_hessian(spec):
      root = _sqrt_psd(h)
      kernels = root @ kernels @ root
    matrix = data_axis.psum(jnp.sum(kernels, axis=0), axis_name) / b_total
    return OutputKernel((matrix + matrix.T) / 2, jnp.zeros_like(matrix))
  if key is None:
    raise ValueError('`key` is required for method="hutchinson".')
  lin = linearization.linearize(apply_fn, params, batch, axis_name=axis_name, loss=spec)
  return linearized_output_kernel(
      lin, spec, batch, key=key, num_probes=num_probes, axis_name=axis_name,
      probe_scope=probe_scope,
  )
