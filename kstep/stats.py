"""Reading kstep's measurements out of an optax state.

Every kstep transform keeps its measurements as scalar arrays in its state, a NamedTuple that
names the fields it reports in ``STATS_FIELDS``. :func:`stats` finds those states wherever they sit
inside an optimizer state (``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
``optax.apply_if_finite``, dicts, lists) and returns the fields as one flat dict. The same values
are reachable one by one with ``optax.tree.get(state, name)``.
"""

from typing import Any

import jax

Array = jax.Array


def _walk(node: Any, found: dict[str, Array]) -> None:
  fields = getattr(type(node), "STATS_FIELDS", None)
  if fields is not None:
    for name in fields:
      if name in found:
        raise ValueError(
            f"several kstep transforms in this state report {name!r}; read each one with "
            f"optax.tree.get(<that transform's state>, {name!r}) instead."
        )
      found[name] = getattr(node, name)
    return
  if isinstance(node, dict):
    for value in node.values():
      _walk(value, found)
  elif isinstance(node, (tuple, list)):
    for value in node:
      _walk(value, found)


def stats(state: Any) -> dict[str, Array]:
  """The measurements of every kstep transform inside ``state``, as ``{name: array}``.

  Keys depend on the transforms present: the controller reports ``k``, ``trace``,
  ``trace_stderr``, ``learning_rate``, ``base_learning_rate`` and its counters; the diagnostics
  report ``lambda_max``, ``batch_sharpness``, ``k`` and their auxiliary values. Values are device
  arrays (no host transfer happens here); call ``jax.device_get`` to print them.

  Raises:
    ValueError: two transforms report the same name (read each state with ``optax.tree.get``).
  """
  found: dict[str, Array] = {}
  _walk(state, found)
  return found
