"""Collectives over the data axis of ``shard_map``/``pmap`` (no-ops when ``axis_name`` is None).

Under ``jax.jit`` with a sharded batch nothing here is needed: the compiler inserts reductions.
Inside ``shard_map``/``pmap`` each device sees its shard of the batch; the estimators pass
``axis_name`` (the mapped axis, or a tuple of axes) to these helpers to combine the devices.
"""

from typing import Any, Hashable

import jax

PyTree = Any
AxisName = Hashable | tuple[Hashable, ...] | None

PROBE_SCOPES = ("global", "per_shard")


def psum(x: Any, axis_name: AxisName) -> Any:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def pmean(x: Any, axis_name: AxisName) -> Any:
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def local(params: PyTree, axis_name: AxisName) -> PyTree:
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
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)

    def vary(x):  # leaves already varying over the axis (e.g. derived from local params) stay
      aval = jax.typeof(x)
      vma = getattr(aval, "vma", None)  # JAX <= 0.9; 0.10: manual_axis_type.varying
      if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
      return x if set(names) <= set(vma) else cast(x, axis_name, to="varying")

    return jax.tree.map(vary, params)
  pvary = getattr(jax.lax, "pvary", None)  # JAX 0.6–0.7
  return params if pvary is None else jax.tree.map(lambda x: pvary(x, axis_name), params)


def global_rows(b: int, axis_name: AxisName) -> tuple[int, Any]:
  """``(B_total, first row of this shard)`` of a batch split evenly over ``axis_name``."""
  if axis_name is None:
    return b, 0
  return b * jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name) * b

def check_probe_scope(probe_scope: str, axis_name: AxisName) -> None:
  """Raises ValueError unless ``probe_scope`` is known and, if ``"per_shard"``, has an axis."""
  if probe_scope not in PROBE_SCOPES:
    raise ValueError(f"`probe_scope` must be one of {PROBE_SCOPES}; got {probe_scope!r}.")
  if probe_scope == "per_shard" and axis_name is None:
    raise ValueError(
        '`probe_scope="per_shard"` needs `axis_name` (the shard_map/pmap axis the batch is split '
        "over); under jax.jit with sharded arrays the estimate is always the global one."
    )
