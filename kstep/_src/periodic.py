"""When periodic work runs: ``count % every == 0``, tied to the gradients.

The K controller's estimate (:mod:`kstep._src.control`) and the trackers' measurements
(:mod:`kstep._src.diagnostics`) run inside a ``lax.cond`` on the update count. Their branches read
only params and the batch, so XLA is free to schedule the cond anywhere in the training step:
XLA:CPU placed it right after the first layer's forward pass, in the middle of the step (MNIST
MLP, 2 cores). ``lax.optimization_barrier`` does not help there: XLA:CPU's pipeline removes it
(it is absent from the optimised HLO). :func:`due` makes the predicate itself depend on the
updates, so the cond runs after the backward pass. :func:`when_due` is that cond, with the
convolutions of the measurement in XLA:CPU's fast order (:mod:`kstep._src.conv_layout`).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kstep._src import conv_layout
from kstep._src.estimators import tree_math as tm

Array = jax.Array


def due(count: Array, every: int, updates: Any) -> Array:
  """``count % every == 0`` (bool scalar), computed after ``updates`` exist.

  The added term ``isnan(t) & (count < 0)``, with t the sum of the first element of every
  non-empty update leaf, is false (an update count is never negative) but XLA cannot know it,
  so the predicate waits for the updates. It reads one element per leaf, not a pass over
  them; leaves sharded over an explicit-axes mesh are left out (there, taking one element is a
  sharding error), so with every leaf sharded that way the predicate is the plain one (why and
  what it saves: ``docs/controller.md``). A leaf sharded over devices without explicit axes
  contributes an element that lives on one of them: one scalar all-reduce per step.

  >>> import jax.numpy as jnp
  >>> bool(due(jnp.int32(20), 10, {"w": jnp.ones(3)})), bool(due(jnp.int32(21), 10, {}))
  (True, False)
  """
  now = count % every == 0
  firsts = [u[(0,) * jnp.ndim(u)].astype(jnp.float32) for u in jax.tree.leaves(updates)
            if jnp.size(u) > 0 and not _explicitly_sharded(u)]
  if not firsts:
    return now
  return now | (jnp.isnan(functools.reduce(jnp.add, firsts)) & (count < 0))


def _explicitly_sharded(x: Any) -> bool:
  """Whether ``x``'s type carries a sharded dimension (an explicit-axes mesh), where taking one
  element is a sharding error; such leaves are left out of the tie."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(s is not None for s in spec)


def when_due(count: Array, every: int, updates: Any, measure: Callable[[Any], Any], state: Any):
  """``measure(state)`` where :func:`due`, else ``state``: one ``lax.cond`` whose true branch has
  its convolutions in the canonical order (:func:`kstep._src.conv_layout.canonical_convs`)."""
  return jax.lax.cond(due(count, every, updates), conv_layout.canonical_convs(measure),
                      lambda s: s, state)


def release(updates: Any, value: Array) -> Any:
  """``updates`` unchanged, but computed after ``value``, a scalar of :func:`when_due`'s result.

  A tracker passes the updates through while its cond reads params; without this tie XLA may
  apply an optimizer's updates chained after it before the cond runs, and with donated params it
  then copies the params for the cond on every step (``tests/test_periodic.py``). The tie is a
  select on a false predicate (:func:`kstep._src.estimators.tree_math.after`), fused into the
  updates' next pass.
  """
  return tm.after(value, updates)
