"""Reading kstep's measurements out of an optax state.

Every kstep transform keeps its measurements as scalar arrays in its state, a NamedTuple that
names the fields it reports in ``STATS_FIELDS``. :func:`stats` finds those states wherever they sit
inside an optimizer state (``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
``optax.apply_if_finite``, dicts, lists) and returns the fields as one flat dict. The same values
are reachable one by one with ``optax.tree.get(state, name)``.

Values come back as plain arrays also where the state's leaves are wrapped: flax NNX's
``nnx.Optimizer(...).opt_state`` holds every leaf in an ``OptArray`` (an ``nnx.Variable``), which
:func:`stats` unwraps, so the values print, format and compare as arrays.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

Array = jax.Array


def _plain(value: Any) -> Any:
  """The array inside a wrapper such as flax NNX's ``OptArray``/``Variable`` (``get_value()``,
  else ``.value``); arrays and other values as they are."""
  for _ in range(8):  # wrappers may nest
    if isinstance(value, (jax.Array, np.ndarray)):
      break
    if callable(getattr(value, "get_value", None)):
      value = value.get_value()
    elif hasattr(value, "value"):
      value = value.value
    else:
      break
  return value


def _walk(node: Any, found: dict[str, Array]) -> None:
  fields = getattr(type(node), "STATS_FIELDS", None)
  if fields is not None:
    for name in fields:
      if name in found:
        raise ValueError(
            f"several kstep transforms in this state report {name!r}; read each one with "
            f"optax.tree.get(<that transform's state>, {name!r}) instead."
        )
      found[name] = _plain(getattr(node, name))
    return
  if isinstance(node, Mapping):  # dicts, and mappings such as flax's nnx.State
    for value in node.values():
      _walk(value, found)
  elif isinstance(node, (tuple, list)):
    for value in node:
      _walk(value, found)


def stats(state: Any) -> dict[str, Array]:
  """The measurements of every kstep transform inside ``state``, as ``{name: array}``.

  Keys depend on the transforms present: the controller reports ``k``, ``k_trace``,
  ``k_learning_rate``, ``gn_lambda_max``, ``sharpness_ratio`` and its counters (see
  :class:`kstep.ScaleByKControlState`); the diagnostics report ``lambda_max``,
  ``batch_sharpness``, ``k`` and their auxiliary values (``STATS_FIELDS`` of each state). Values
  are plain device arrays, also for a flax NNX optimizer's state (no host transfer happens here);
  call ``jax.device_get`` to fetch them.

  Raises:
    ValueError: two transforms report the same name (read each state with ``optax.tree.get``).
  """
  found: dict[str, Array] = {}
  _walk(state, found)
  return found
