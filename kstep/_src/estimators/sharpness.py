"""Batch Sharpness (Andreyev & Beneventano, EoSS, Definition 1) over stacked batches."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kstep._src import arguments
from kstep._src.estimators import products, sample_stats
from kstep._src.estimators.data_axis import AxisName

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, Any], Array]


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
  along its second axis (each device holds ``(M, B/n, ...)``). Complex ``params`` raise a
  ``ValueError``.

  Example:
    >>> import jax.numpy as jnp, kstep
    >>> loss_fn = lambda p, h: 0.5 * jnp.sum(h * p**2)  # batch m: H = diag(h_m), g = h_m · p
    >>> batches = jnp.array([[1.0, 3.0], [2.0, 2.0]])  # M = 2 batches stacked
    >>> bs = kstep.batch_sharpness(loss_fn, jnp.ones(2), batches)
    >>> round(float(bs.value), 4)  # (28 + 16) / (10 + 8)
    2.4444
    >>> [round(float(c), 4) for c in bs.curvature], [round(float(d), 4) for d in bs.grad_sq_norm]
    ([28.0, 16.0], [10.0, 8.0])
  """
  arguments.check_real_params(params, "batch_sharpness")
  if reduction not in ("ratio_of_means", "mean_of_ratios"):
    raise ValueError(
        f'`reduction` must be "ratio_of_means" or "mean_of_ratios"; got {reduction!r}.'
    )
  num, den = jax.lax.map(
      lambda b: products.batch_curvature(loss_fn, params, b, axis_name=axis_name), batches
  )
  if reduction == "ratio_of_means":
    value, stderr = sample_stats.ratio_of_means(num, den)
  else:
    ratios = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    value, stderr = sample_stats.mean_and_stderr(ratios)
  return BatchSharpness(value, stderr, num, den)
