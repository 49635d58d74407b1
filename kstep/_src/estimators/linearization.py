"""The model linearised once on a batch: every probe of an estimate shares one forward pass.

A K estimate differentiates the same outputs several times: the trace probes (VJPs), the trace
floor's NTK probe (a VJP), the output kernel's C cotangents per probe (VJPs) and the curvature
guard's Gauss–Newton products (a JVP and a VJP each). :func:`linearize` runs the forward pass once
(``jax.linearize``) and returns the JVP and its transpose, the VJP, so that each of those costs
only its own linear pass.

Inside ``shard_map``/``pmap`` (``axis_name``) the params are marked as varying over the axis
first (see :func:`kstep._src.estimators.data_axis.local`), so ``vjp`` returns this device's
contribution; the callers reduce it.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kstep._src import losses
from kstep._src.estimators import data_axis
from kstep._src.estimators.data_axis import AxisName

Array = jax.Array
PyTree = Any


class LinearizedModel(NamedTuple):
  """``apply_fn(·, batch)`` linearised at ``params``.

  Attributes:
    params: the params it was linearised at (marked varying over ``axis_name``).
    outputs: the outputs reshaped to ``(b, C)`` (this device's rows), in the model's dtype. For
      a loss with ``positions`` every position is a row: ``(B, T, V)`` logits give ``b = B·T``.
    out_shape: the outputs' own shape ``(b, ...)``.
    jvp: ``v`` (params-shaped, any float dtype) -> ``J v`` of shape ``(b, C)``, float32.
    vjp: ``u`` of shape ``(b, C)`` -> ``Jᵀ u`` (params-shaped, params' dtypes), this device's
      part (not reduced over ``axis_name``).
    num_rows: rows of this device, b.
    num_rows_total: rows of the whole batch, B (b times the size of ``axis_name``).
    first_row: index of this device's first row in the whole batch.
  """

  params: PyTree
  outputs: Array
  out_shape: tuple[int, ...]
  jvp: Callable[[PyTree], Array]
  vjp: Callable[[Array], PyTree]
  num_rows: int
  num_rows_total: int
  first_row: Any


def linearize(apply_fn: Callable[[PyTree, Any], Array], params: PyTree, batch: Any, *,
              axis_name: AxisName = None, loss: losses.OutputLoss | None = None
              ) -> LinearizedModel:
  """One forward pass of ``apply_fn(params, batch)``, its JVP and VJP (memory: one VJP's).
  ``loss``: the loss the rows are for (:func:`kstep._src.losses.rows_per_example`)."""
  params = data_axis.local(params, axis_name)
  outputs, f_jvp = jax.linearize(lambda p: apply_fn(p, batch), params)
  f_vjp = jax.linear_transpose(f_jvp, params)
  out_shape, out_dtype = outputs.shape, outputs.dtype
  per = losses.rows_per_example(loss, out_shape)
  b = out_shape[0] * per
  b_total, first_row = data_axis.global_rows(out_shape[0], axis_name)
  b_total, first_row = b_total * per, first_row * per
  dtypes = jax.tree.map(lambda x: x.dtype, params)

  def jvp(v: PyTree) -> Array:
    # Tangents typed like the (varying) primals, e.g. a replicated random probe.
    v = data_axis.local(jax.tree.map(lambda x, d: jnp.asarray(x, d), v, dtypes), axis_name)
    return f_jvp(v).reshape(b, -1).astype(jnp.float32)

  def vjp(u: Array) -> PyTree:
    return f_vjp(u.reshape(out_shape).astype(out_dtype))[0]

  return LinearizedModel(params, outputs.reshape(b, -1), out_shape, jvp, vjp, b, b_total, first_row)


def vjps(lin: LinearizedModel, cotangents: Array) -> list[PyTree]:
  """``[Jᵀ u_1, ..., Jᵀ u_k]`` for a stack ``cotangents`` of shape ``(k, b, ...)`` (k static).

  One VJP per cotangent, unrolled, all sharing the one forward pass: on CPU cheaper than one
  ``vmap``ped VJP over the stack (``docs/controller.md``, "Costs").
  """
  return [lin.vjp(u) for u in cotangents]


def num_rows(apply_fn: Callable[[PyTree, Any], Array], params: PyTree, batch: Any, *,
             axis_name: AxisName = None, out_shape: tuple[int, ...] | None = None,
             loss: losses.OutputLoss | None = None) -> tuple[int, int]:
  """``(B, C)`` of ``apply_fn(params, batch)`` from shapes alone (no computation): B the rows of
  the whole batch (summed over ``axis_name``), C the outputs per row (1 for ``(B,)``).
  ``out_shape``: the outputs' shape when already known (saves tracing the model again).
  ``loss``: with ``positions``, every position is a row (``(B, T, V)``: ``(B·T, V)``)."""
  shape = (jax.eval_shape(lambda p: apply_fn(p, batch), params).shape if out_shape is None
           else tuple(out_shape))
  if len(shape) == 0:
    raise ValueError(
        "apply_fn(params, batch) must return outputs with the examples on axis 0, shape (B, ...); "
        "got a scalar."
    )
  per = losses.rows_per_example(loss, shape)
  c = 1
  for d in shape[1:]:
    c *= d
  b_total, _ = data_axis.global_rows(shape[0], axis_name)
  return b_total * per, c // per


def precondition(lin: LinearizedModel, inv_sqrt: PyTree | None) -> LinearizedModel:
  """``lin`` in the coordinates ``φ = P^{1/2} θ`` of a diagonal preconditioner P: the Jacobian
  ``J P^{-1/2}``, given ``inv_sqrt = P^{-1/2}`` (params-shaped, positive). Its NTK is
  ``J P⁻¹ Jᵀ`` and its Gauss–Newton matrix ``P^{-1/2} G P^{-1/2}`` (``docs/design.md``,
  "Adaptive optimizers"); ``None`` returns ``lin`` unchanged. Costs one elementwise product
  per JVP and per VJP."""
  if inv_sqrt is None:
    return lin
  scale = lambda tree: jax.tree.map(
      lambda x, s: (x.astype(jnp.float32) * s.astype(jnp.float32)).astype(x.dtype), tree, inv_sqrt)
  return lin._replace(jvp=lambda v: lin.jvp(scale(v)), vjp=lambda u: scale(lin.vjp(u)))
