"""Checks of user arguments, shared by the controller, the trackers and the estimators.

Every check raises ``ValueError`` naming the argument and its allowed range. Numbers that
``optax.inject_hyperparams`` passes traced (inside a jitted ``update``) cannot be checked there:
``init`` saw the concrete value and checked it.
"""

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


def is_number(x: Any) -> bool:
  """True for values known at construction (Python/NumPy numbers, concrete scalar arrays)."""
  if isinstance(x, bool):
    return False
  if isinstance(x, numbers.Number):
    return True
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.ndim == 0


def is_traced_scalar(x: Any) -> bool:
  """True for a scalar known only inside jit: a hyperparameter that ``optax.inject_hyperparams``
  passes to the factory again at every jitted ``update``. It cannot be checked (``init`` saw the
  concrete value and checked it there)."""
  return isinstance(x, jax.core.Tracer) and jnp.ndim(x) == 0


def check_positive_int(name: str, value: Any) -> None:
  if is_traced_scalar(value):
    return
  if isinstance(value, bool) or not is_number(value) or int(value) != value or value < 1:
    raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


def check_static_int(name: str, value: Any, what: str) -> int:
  """``value`` as a Python int >= 1; ``what`` says why it must be static (it sets a shape or a
  loop bound), for the error raised when ``optax.inject_hyperparams`` traces it."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"`{name}` {what} and must be a static Python int; under optax.inject_hyperparams list "
        "it in `static_args`."
    )
  check_positive_int(name, value)
  return int(value)


def static_or_traced_int(value: Any) -> int | Array:
  """A checked integer argument that may be traced: a Python int when concrete."""
  return value if is_traced_scalar(value) else int(value)


def check_positive_float(name: str, value: Any) -> None:
  if is_traced_scalar(value):
    return
  if not is_number(value) or not float(value) > 0.0:
    raise ValueError(f"`{name}` must be a number > 0; got {value!r}.")


def check_callable(name: str, value: Any, signature: str) -> None:
  if not callable(value):
    raise ValueError(f"`{name}` must be callable {signature}; got {value!r}.")


def check_decay(decay: Any) -> None:
  if decay is None or is_traced_scalar(decay):
    return
  if not is_number(decay) or not 0.0 <= float(decay) < 1.0:
    raise ValueError(f"`decay` must be in [0, 1) or None (all-time mean); got {decay!r}.")


def check_learning_rate(learning_rate: Any, *, optional: bool) -> None:
  if learning_rate is None and optional:
    return
  if callable(learning_rate) or is_traced_scalar(learning_rate):
    return
  if not is_number(learning_rate) or not float(learning_rate) > 0.0:
    what = "a number > 0, an optax schedule" + (" or None" if optional else "")
    raise ValueError(f"`learning_rate` must be {what}; got {learning_rate!r}.")


def check_momentum(momentum: Any) -> None:
  if is_traced_scalar(momentum):
    return
  if not is_number(momentum) or not 0.0 <= float(momentum) < 1.0:
    raise ValueError(f"`momentum` must be in [0, 1); got {momentum!r}.")


def _is_key(seed: Any) -> bool:
  return isinstance(seed, jax.Array) and (
      jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) or seed.shape == (2,)
  )


def check_seed(seed: Any, name: str = "seed") -> None:
  """Checks a seed at construction without making an array: an int (or an integer scalar array,
  e.g. injected by ``optax.inject_hyperparams``) or a PRNG key (typed, or uint32 of shape (2,)).
  The key itself is made in ``init`` (:func:`prng_key`), where it gets the state's placement."""
  if _is_key(seed):
    return
  is_int_array = (
      isinstance(seed, jax.Array) and seed.ndim == 0 and jnp.issubdtype(seed.dtype, jnp.integer)
  )
  if isinstance(seed, bool) or not (isinstance(seed, (int, np.integer)) or is_int_array):
    raise ValueError(f"`{name}` must be an int or a PRNG key; got {seed!r}.")


def prng_key(seed: int | Array) -> Array:
  """``PRNGKey(seed)`` for an integer seed; a PRNG key (typed, or uint32 of shape (2,)) as is."""
  check_seed(seed)
  return seed if _is_key(seed) else jax.random.PRNGKey(seed)


def schedule_value(x: optax.ScalarOrSchedule, count: Array) -> Array:
  """A float or an optax schedule evaluated at ``count``, as a float32 scalar."""
  return jnp.asarray(x(count) if callable(x) else x, jnp.float32)


def check_int(name: str, value: Any) -> int:
  """``value`` as a Python int >= 1, for arguments that set shapes or loop bounds of a pure
  function (never traced)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
  return int(value)


def check_real_params(params: Any, who: str) -> None:
  """Raises ValueError if any leaf of ``params`` is complex: kstep's traces and curvature
  products assume real parameters (a complex leaf would silently give a wrong trace, e.g. half
  of ‖J‖²_F). Works on concrete, traced and abstract (``ShapeDtypeStruct``) leaves."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = np.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
          f"kstep.{who}: `params` must be real; params{jax.tree_util.keystr(path)} has dtype "
          f"{dtype}. Split complex parameters into real and imaginary parts."
      )


def check_band(target: Any) -> None:
  """``target`` is a pair ``(lo, hi)`` of numbers (``0 < lo < hi``) or schedules."""
  try:
    lo, hi = target
  except (TypeError, ValueError):
    msg = f"`target` must be a pair (lo, hi) with 0 < lo < hi, or None; got {target!r}."
    raise ValueError(msg) from None
  if is_number(lo) and is_number(hi) and not 0 < float(lo) < float(hi):
    raise ValueError(f"`target` must satisfy 0 < lo < hi; got ({lo!r}, {hi!r}).")
  for end in (lo, hi):
    if not (is_number(end) or callable(end) or isinstance(end, jax.Array)):
      raise ValueError(f"`target` ends must be floats or schedules; got {end!r}.")


def check_optional(name: str, value: Any, low: float, high: float | None = None) -> None:
  """``value`` is None, traced, or a number in ``(low, high]`` (``high`` None: unbounded)."""
  if value is None or is_traced_scalar(value):
    return
  bad = not is_number(value) or not float(value) > low
  bad = bad or (high is not None and float(value) > high)
  if bad:
    rng = f"in ({low}, {high}]" if high is not None else f"> {low}"
    raise ValueError(f"`{name}` must be a number {rng} or None; got {value!r}.")


def band_decay_fn(decay_steps: Any) -> Callable[[Array], Array] | None:
  """The band's decay d(t): a cosine from 1 to 0 over ``decay_steps`` updates (an int), the
  schedule ``decay_steps`` itself (a callable of the update count), or None (no decay)."""
  if decay_steps is None:
    return None
  if callable(decay_steps):
    return decay_steps
  whole = is_number(decay_steps) and int(decay_steps) == decay_steps
  if isinstance(decay_steps, bool) or not whole or decay_steps < 1:
    raise ValueError("`decay_steps` must be an integer >= 1, an optax schedule of the update "
                     f"count or None; got {decay_steps!r}.")
  return optax.cosine_decay_schedule(1.0, int(decay_steps))


def check_call(params: Any, extra_args: dict) -> tuple[Any, Any]:
  """``(params, batch)`` of a controller's ``update`` call.

  Raises:
    ValueError: ``batch=`` or ``params`` missing, naming the way to pass them.
  """
  batch = extra_args.get("batch")
  if batch is None:
    raise ValueError(
        "kstep's K controller estimates K on the batch the gradients came from: call "
        "`opt.update(grads, state, params, batch=batch)` (inside optax.chain the keyword is "
        "forwarded; with flax nnx, `optimizer.update(model, grads, batch=batch)`; with a flax "
        "linen TrainState, use kstep.flax.TrainState and `state.apply_gradients(grads=grads, "
        "batch=batch)`)."
    )
  if params is None:
    raise ValueError("kstep's K controller needs `params`: opt.update(grads, state, params, "
                     "batch=batch).")
  return params, batch
