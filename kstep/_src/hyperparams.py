"""``optax.inject_hyperparams`` that knows which arguments of a factory are not hyperparameters.

``optax.inject_hyperparams(factory)`` sorts the factory's arguments by their *values*: a callable
becomes a schedule (called with the step count), an int or float becomes an array (traced inside
a jitted ``update``), everything else is passed as is. kstep's factories take callables that are
not schedules (``apply_fn``, ``loss_fn``, a callable ``loss``) and ints that set shapes or loops
(``num_probes``, ``num_iters``, ``batch_size``, ``seed``, ...), so without ``static_args`` optax
calls ``apply_fn(count)`` and fails with ``TypeError: <lambda>() missing 1 required positional
argument: 'batch'``. :func:`inject_hyperparams` lists them for you:

>>> import optax, kstep
>>> opt = kstep.inject_hyperparams(kstep.k_controlled_sgd)(
...     0.1, apply_fn=lambda p, batch: batch["x"] @ p["w"])
>>> sorted(static_arg_names(kstep.k_controlled_sgd))[:4]
['apply_fn', 'axis_name', 'batch_size', 'decay_steps']

The rule reads the factory's type annotations: an argument is a hyperparameter (injected, and
changeable later through ``state.hyperparams[name]``) when its annotation admits a float, e.g.
``learning_rate: optax.ScalarOrSchedule``, ``momentum: float``, ``max_scale: float | None``;
any other annotated argument (``int``, ``str``, ``bool``, ``Callable``, ``optax.Schedule``,
tuples, the grouped options :class:`kstep.Estimate` and :class:`kstep.Guard`) is static.
Arguments without an annotation keep optax's rule. So it works for any optax
factory as well (``optax.adafactor``'s ``min_dim_size_to_factor: int`` becomes static, for
instance). One rule depends on the value: ``k_controlled_sgd`` leaves its momentum part out for a
Python ``momentum=0`` (as ``optax.sgd`` does for ``None``), so a Python zero momentum is static
too and the injected state has the same tree as the plain optimizer's.
"""

import functools
import inspect
import numbers
import types
import typing
from typing import Any, Callable, Iterable

import optax

from kstep._src import control

# Value-dependent static arguments: factory -> {argument: predicate on the bound value}. A value
# for which the predicate holds changes which parts the factory builds, so it must stay static.
STATIC_IF: dict[Callable[..., Any], dict[str, Callable[[Any], bool]]] = {
    control.k_controlled_sgd: {
        "momentum": lambda v: (
            isinstance(v, numbers.Number) and not isinstance(v, bool) and float(v) == 0.0
        ),
    },
}

_UNKNOWN = object()


def _admits_float(tp: Any) -> bool:
  """Whether a value of annotation ``tp`` may be a float (then optax can inject it)."""
  if tp is Any or tp is _UNKNOWN or isinstance(tp, typing.TypeVar):
    return True
  origin = typing.get_origin(tp)
  if origin is typing.Union or origin is types.UnionType:
    return any(_admits_float(arg) for arg in typing.get_args(tp))
  if isinstance(tp, type) and not isinstance(tp, types.GenericAlias):
    if issubclass(tp, (bool, numbers.Integral)):
      return False
    return issubclass(tp, numbers.Number)  # float, complex, numbers.Real, np.floating, ...
  return False


def _annotations(factory: Callable[..., Any]) -> dict[str, Any]:
  """Parameter annotations, resolved (string annotations too, where they resolve)."""
  params = inspect.signature(factory).parameters
  try:
    hints = typing.get_type_hints(factory)
  except Exception:  # noqa: BLE001 - unresolvable string annotations: fall back per parameter
    hints = {}
  out = {}
  for name, p in params.items():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    if name in hints:
      out[name] = hints[name]
    elif p.annotation is p.empty or isinstance(p.annotation, str):
      out[name] = _UNKNOWN
    else:
      out[name] = p.annotation
  return out


def static_arg_names(factory: Callable[..., Any], arguments: dict[str, Any] | None = None
                     ) -> frozenset[str]:
  """The arguments of ``factory`` that :func:`inject_hyperparams` keeps static.

  Args:
    factory: an optax optimizer factory (``kstep.k_controlled_sgd``, ``optax.adam``, ...).
    arguments: the bound arguments of one call, for the value-dependent rules (``STATIC_IF``).
  """
  target = inspect.unwrap(factory)
  names = {name for name, tp in _annotations(target).items() if not _admits_float(tp)}
  for name, predicate in STATIC_IF.get(target, {}).items():
    if arguments is not None and name in arguments and predicate(arguments[name]):
      names.add(name)
  return frozenset(names)


def inject_hyperparams(
    factory: Callable[..., Any],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: Any = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """``optax.inject_hyperparams`` with the factory's static arguments added automatically.

  ``kstep.inject_hyperparams(kstep.k_controlled_sgd)(0.1, apply_fn=..., loss=...)`` builds the
  same optimizer as ``kstep.k_controlled_sgd(0.1, ...)`` (same updates; its ``inner_state`` has
  the same tree), with ``learning_rate`` and the other float arguments injected into
  ``state.hyperparams``. The static arguments are :func:`static_arg_names` of the factory plus
  ``static_args``.

  Args:
    factory: any optax optimizer factory (kstep's or optax's).
    static_args: more argument names to keep static (as in ``optax.inject_hyperparams``).
    hyperparam_dtype: as in ``optax.inject_hyperparams`` (``None``: the params' dtype).

  Returns:
    A function with the factory's signature that returns the injected optimizer.
  """
  extra = {static_args} if isinstance(static_args, str) else set(static_args)
  signature = inspect.signature(factory)
  unknown = extra - set(signature.parameters)
  if unknown:
    raise ValueError(
        f"`static_args` names {sorted(unknown)}, which are not arguments of "
        f"{getattr(factory, '__name__', factory)}; its arguments are "
        f"{sorted(signature.parameters)}."
    )

  @functools.wraps(factory)
  def wrapped(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    static = static_arg_names(factory, bound.arguments) | extra
    return optax.inject_hyperparams(
        factory, static_args=tuple(sorted(static)), hyperparam_dtype=hyperparam_dtype
    )(*args, **kwargs)

  return wrapped
