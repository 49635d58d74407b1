"""Matrix-free curvature products: Hessian-vector (forward-over-reverse), Gauss–Newton-vector,
and the curvature of a batch's loss along its own gradient (the numerator of Batch Sharpness).

With ``axis_name`` (inside ``shard_map``/``pmap``) every product is that of the global batch: one
all-reduce of P floats each.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kstep._src import arguments, losses
from kstep._src.estimators import data_axis, linearization
from kstep._src.estimators import tree_math as tm
from kstep._src.estimators.data_axis import AxisName

Array = jax.Array
PyTree = Any
ApplyFn = Callable[[PyTree, Any], Array]
LossFn = Callable[[PyTree, Any], Array]


def hvp(
    loss_fn: LossFn, params: PyTree, batch: Any, v: PyTree, *, axis_name: AxisName = None
) -> PyTree:
  """Hessian-vector product ``∇²_θ loss_fn(params, batch) · v``, forward-over-reverse.

  With ``axis_name``, the Hessian of the mean of the devices' losses (one all-reduce of P floats).
  Complex ``params`` raise a ``ValueError``.

  Example:
    >>> import jax.numpy as jnp, kstep
    >>> loss_fn = lambda p, batch: jnp.sum(p[0] ** 2 * p[1])  # Hessian [[2 p1, 2 p0], [2 p0, 0]]
    >>> kstep.hvp(loss_fn, jnp.array([1.0, 3.0]), None, jnp.array([1.0, 0.0])).tolist()
    [6.0, 2.0]
  """
  arguments.check_real_params(params, "hvp")
  primal, tangent = data_axis.local((params, v), axis_name)
  local = jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (primal,), (tangent,))[1]
  return data_axis.pmean(local, axis_name)


def _grad(loss_fn: LossFn, params: PyTree, batch: Any, *, axis_name: AxisName = None) -> PyTree:
  """Gradient of ``loss_fn(params, batch)``; with ``axis_name``, of the mean over the devices."""
  return data_axis.pmean(jax.grad(loss_fn)(data_axis.local(params, axis_name), batch), axis_name)


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
  Complex ``params`` raise a ``ValueError``.
  """
  arguments.check_real_params(params, "gauss_newton_vp")
  spec = losses.resolve_loss(loss)
  lin = linearization.linearize(apply_fn, params, batch, axis_name=axis_name, loss=spec)
  return linearized_gauss_newton_vp(lin, spec, batch, v, axis_name=axis_name)


def linearized_gauss_newton_vp(
    lin: linearization.LinearizedModel,
    loss: losses.OutputLoss,
    batch: Any,
    v: PyTree,
    *,
    axis_name: AxisName = None,
) -> PyTree:
  """:func:`gauss_newton_vp` on an already linearised model: one JVP and one VJP, no forward."""
  out = lin.vjp(gauss_newton_cotangent(lin, loss, batch, v, axis_name=axis_name))
  return data_axis.psum(out, axis_name)


def gauss_newton_quadratic(
    lin: linearization.LinearizedModel,
    loss: losses.OutputLoss,
    batch: Any,
    v: PyTree,
    *,
    axis_name: AxisName = None,
) -> Array:
  """``vᵀ G v = (1/B) Σ_i (J_i v)ᵀ H_i (J_i v)`` (float32, reduced over ``axis_name``): the
  Gauss–Newton quadratic form from one JVP (no VJP)."""
  spec = loss.for_output_shape(lin.out_shape)
  jv = lin.jvp(data_axis.local(v, axis_name))
  value = jnp.sum(jv * spec.gnvp(lin.outputs, batch, jv).astype(jnp.float32))
  return data_axis.psum(value / lin.num_rows_total, axis_name)


def gauss_newton_cotangent(
    lin: linearization.LinearizedModel,
    loss: losses.OutputLoss,
    batch: Any,
    v: PyTree,
    *,
    axis_name: AxisName = None,
) -> Array:
  """``H J v / B`` (this device's rows, ``(b, C)``): one JVP; its VJP, reduced over
  ``axis_name``, is the Gauss–Newton product ``G v``."""
  spec = loss.for_output_shape(lin.out_shape)
  jv = lin.jvp(data_axis.local(v, axis_name))
  return spec.gnvp(lin.outputs, batch, jv) / lin.num_rows_total


def batch_curvature(
    loss_fn: LossFn, params: PyTree, batch: Any, *, axis_name: AxisName = None
) -> tuple[Array, Array]:
  """``(g_Bᵀ H_B g_B, ‖g_B‖²)`` for one batch: one gradient and one HVP, in float32.

  With ``axis_name`` the batch is the union of the devices' shards (two all-reduces of P floats).
  Complex ``params`` raise a ``ValueError``.
  """
  arguments.check_real_params(params, "batch_curvature")
  p32 = tm.f32(params)
  g = _grad(loss_fn, p32, batch, axis_name=axis_name)
  hg = hvp(loss_fn, p32, batch, g, axis_name=axis_name)
  return tm.vdot(g, hg), tm.sq_norm(g)
