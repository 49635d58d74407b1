"""Float32 vector algebra on pytrees shaped like params (the eigensolvers' vectors).

Vectors are pytrees whose leaves keep the layout of their parameter (no ravel/concatenate per
product), so under ``jax.jit`` with sharded (e.g. FSDP) params the compiler may shard every vector
like the params. Reductions (``vdot``, ``sq_norm``) accumulate in float32 whatever the leaf dtype.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

Array = jax.Array
PyTree = Any


def f32(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def sq_norm(tree: PyTree) -> Array:
  leaves = jax.tree.leaves(tree)
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0.0))


def vdot(a: PyTree, b: PyTree) -> Array:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return sum(
      (jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)) for x, y in pairs), jnp.float32(0.0)
  )

def scale(a: Array, x: PyTree) -> PyTree:
  return jax.tree.map(lambda xi: a * xi, x)


def sub(x: PyTree, y: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, x, y)


def where(cond: Array, x: PyTree, y: PyTree) -> PyTree:
  return jax.tree.map(lambda xi, yi: jnp.where(cond, xi, yi), x, y)


def after(x: Array, tree: PyTree) -> PyTree:
  """``tree`` unchanged, but computed after the scalar ``x``: each numeric leaf passes through a
  select on ``isnan(x) & (x == x)``, false for every x but not foldable by XLA. Used to run
  the steps of a loop one after another, each with its own forward pass, so that XLA neither
  hoists that pass out of the loop nor keeps two of them alive at once."""
  never = jnp.isnan(x) & (x == x)

  def tie(leaf: Any) -> Any:
    if not (jnp.issubdtype(jnp.result_type(leaf), jnp.number)
            or jnp.result_type(leaf) == jnp.bool_):
      return leaf
    return jnp.where(never, jnp.zeros_like(leaf), leaf)

  return jax.tree.map(tie, tree)


def norm(x: PyTree) -> Array:
  return jnp.sqrt(sq_norm(x))


def unit(x: PyTree) -> tuple[PyTree, Array]:
  """``(x / ‖x‖, ‖x‖)``, with ``x`` itself returned where ``‖x‖ = 0``."""
  n = norm(x)
  return scale(jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 1.0), x), n


def zeros_like(like: PyTree) -> PyTree:
  """Float32 zeros shaped (and, under an explicit mesh, sharded) like each leaf of ``like``."""
  return jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), like)


def ones_unit(like: PyTree) -> PyTree:
  size = sum(x.size for x in jax.tree.leaves(like))
  return jax.tree.map(lambda x: jnp.full_like(x, 1.0 / size**0.5, jnp.float32), like)


def random_unit(key: Array, like: PyTree) -> PyTree:
  """A random unit vector, float32, shaped like ``like`` (one normal draw of size P).

  Each leaf carries the sharding of its leaf of ``like``: the draw is one flat vector (the same
  numbers on any device layout), and adding zeros made by ``zeros_like`` of the leaf gives it the
  leaf's sharding under an explicit mesh (``jax.sharding.AxisType.Explicit``), where a
  ``while_loop`` carry must keep its sharding. Under ``jax.jit`` with automatic axes the addition
  changes nothing.
  """
  flat, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), like))
  drawn = unravel(jax.random.normal(key, flat.shape, jnp.float32))
  return unit(jax.tree.map(jnp.add, drawn, zeros_like(like)))[0]
