"""The checks optax applies to its own optimizers, applied to kstep's transforms.

optax 0.2.8 tests every optimizer it ships the same way (``optax/_src/alias_test.py``,
``optax/contrib/_common_test.py``, ``optax/transforms/_accumulation_test.py``,
``optax/_src/sharding_test.py``). This module asks the same of ``kstep.k_controlled_sgd`` and of
each tracker (chained after ``optax.sgd`` with momentum), in this project's own words:

* it minimises a parabola and the Rosenbrock function (jitted, ``lax.scan``);
* ``optax.tree.map_params`` works on its state, and ``init`` accepts abstract params;
* ``update`` accepts keyword arguments it does not know;
* the second jitted ``update`` does not compile again;
* ``inject_hyperparams`` gives the same updates and the same state tree as the plain optimizer;
* updates keep the params' dtype (float32, bfloat16, float16) and the state keeps its shapes and
  dtypes, also through ``lax.cond`` inside ``jit``;
* ``optax.MultiSteps`` and ``optax.apply_if_finite`` wrap it;
* ``learning_rate`` takes an optax schedule and is annotated ``optax.ScalarOrSchedule``;
* ``optax.tree.get(state, name)`` finds every stat the state reports (``STATS_FIELDS``).

Explicit-mesh sharding (``sharding_test.py``'s mesh checks) lives in tests/explicit_mesh_cases.py.

The objectives are written as MSE regressions so that kstep has a model to measure: the "model"
maps params to outputs ``f(params)`` of one example, the batch holds its targets ``y``, and
``loss = ½ Σ_c (f_c − y_c)²`` is the objective itself (``loss="mse"``, B = 1).
"""

import contextlib
import dataclasses
import functools
import inspect
import logging
import re
import typing
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep

SQRT2 = float(np.sqrt(2.0))
LR = 1e-3  # the trackers' SGD (momentum 0.9) and the controller's base LR
MOMENTUM = 0.9
EVERY = 5  # measurement period of the trackers and the controller


@dataclasses.dataclass(frozen=True)
class Problem:
  """An objective as a one-example MSE regression ``½ ‖f(params) − y‖²``."""

  name: str
  outputs: Callable[[jax.Array], jax.Array]  # f(params), shape (C,)
  targets: tuple[float, ...]  # y
  start: tuple[float, ...]
  solution: tuple[float, ...]
  steps: int  # enough jitted steps for SGD (momentum 0.9, LR 1e-3) to reach the solution

  def apply_fn(self, params, batch):
    del batch  # one example; the targets are in the batch, the inputs in f
    return self.outputs(params)[None, :]

  def loss_fn(self, params, batch):
    err = self.apply_fn(params, batch) - batch["y"]
    return 0.5 * jnp.mean(jnp.sum(jnp.square(err.astype(jnp.float32)), axis=-1))

  def params(self, dtype=jnp.float32):
    return jnp.asarray(self.start, dtype)

  def batch(self, dtype=jnp.float32):
    return {"y": jnp.asarray(self.targets, dtype)[None, :]}


# Σ (p − p*)²: f = √2 p, y = √2 p*.
PARABOLA = Problem(
    "parabola", lambda p: SQRT2 * p, targets=(SQRT2, -SQRT2, SQRT2), start=(-1.0, 10.0, 1.0),
    solution=(1.0, -1.0, 1.0), steps=2_000,
)
# (a − x)² + b (y − x²)² with a = 1, b = 100: f = √2 (−x, 10 (y − x²)), y = √2 (−1, 0).
ROSENBROCK = Problem(
    "rosenbrock", lambda p: SQRT2 * jnp.stack([-p[0], 10.0 * (p[1] - p[0] ** 2)]),
    targets=(-SQRT2, 0.0), start=(0.0, 0.0), solution=(1.0, 1.0), steps=10_000,
)
PROBLEMS = (PARABOLA, ROSENBROCK)

NAMES = ("k_controlled_sgd", "k_controlled_adam", "track_lambda_max", "track_batch_sharpness",
         "track_k")
CONTROLLERS = ("k_controlled_sgd", "k_controlled_adam")


def spec(name: str, problem: Problem, learning_rate: Any = LR) -> tuple[Callable, dict]:
  """The kstep factory under test and its keyword arguments."""
  if name == "k_controlled_sgd":
    return kstep.k_controlled_sgd, dict(
        learning_rate=learning_rate, apply_fn=problem.apply_fn, momentum=MOMENTUM,
        estimate=kstep.Estimate(every=EVERY))
  if name == "k_controlled_adam":
    return kstep.k_controlled_adam, dict(
        learning_rate=learning_rate, apply_fn=problem.apply_fn, b1=MOMENTUM,
        estimate=kstep.Estimate(every=EVERY))
  if name == "track_lambda_max":
    return kstep.track_lambda_max, dict(loss_fn=problem.loss_fn, every=EVERY, num_iters=10,
                                        learning_rate=learning_rate, momentum=MOMENTUM)
  if name == "track_batch_sharpness":
    return kstep.track_batch_sharpness, dict(
        loss_fn=problem.loss_fn, every=EVERY, learning_rate=learning_rate, momentum=MOMENTUM)
  if name == "track_k":
    return kstep.track_k, dict(apply_fn=problem.apply_fn, learning_rate=learning_rate,
                               momentum=MOMENTUM, every=EVERY, estimator="exact")
  raise ValueError(name)


def make(name: str, problem: Problem = PARABOLA, learning_rate: Any = LR,
         wrap: Callable = lambda factory: factory) -> optax.GradientTransformationExtraArgs:
  """The optimizer under test: the controller alone, or SGD with momentum and the tracker."""
  factory, kwargs = spec(name, problem, learning_rate)
  transform = wrap(factory)(**kwargs)
  if name in CONTROLLERS:
    return transform
  return optax.chain(optax.sgd(learning_rate, momentum=MOMENTUM), transform)


def measured(tree: Any) -> Any:
  """``tree`` (a state or its stats) without the stats that are NaN by definition here: the
  controller's ``k_ntk_scale`` (no trace floor on these MSE problems) and its
  ``sharpness_growth`` before its second λ estimate; the check that they are NaN."""
  for name in ("k_ntk_scale", "sharpness_growth"):
    found = optax.tree.get_all_with_path(tree, name)
    if not found:
      continue
    if name == "sharpness_growth":
      counts = [v for _, v in optax.tree.get_all_with_path(tree, "sharpness_num_estimates")]
      if all(int(c) >= 2 for c in counts):
        continue
    assert all(bool(jnp.isnan(value)) for _, value in found), name
    tree = optax.tree.set(tree, **{name: 0.0})
  return tree


def step_fn(opt, problem: Problem, **extra):
  """One training step (params, state, batch) -> (params, state, updates), not jitted."""
  def step(params, state, batch):
    grads = jax.grad(problem.loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch, **extra)
    return optax.apply_updates(params, updates), state, updates

  return step


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def train(opt, problem, params, state, steps):
  """``steps`` jitted steps on the problem's batch under ``lax.scan``."""
  step = step_fn(opt, problem)
  batch = problem.batch(params.dtype)

  def body(carry, _):
    params, state, _ = step(*carry, batch)
    return (params, state), None

  (params, state), _ = jax.lax.scan(body, (params, state), length=steps)
  return params, state


def kstep_states(state: Any) -> list[Any]:
  """Every state inside ``state`` that reports stats (has ``STATS_FIELDS``)."""
  found = []

  def walk(node):
    if hasattr(type(node), "STATS_FIELDS"):
      found.append(node)
    elif isinstance(node, dict):
      for v in node.values():
        walk(v)
    elif isinstance(node, (tuple, list)):
      for v in node:
        walk(v)

  walk(state)
  return found


@functools.cache
def first_update(name: str) -> tuple[Any, Any]:
  """(updates, state) of the plain optimizer's first jitted update on the parabola (float32),
  the reference of the wrapper tests."""
  opt = make(name)
  params, batch = PARABOLA.params(), PARABOLA.batch()
  grads = jax.grad(PARABOLA.loss_fn)(params, batch)
  return jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params, batch=batch)


def avals(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def assert_trees_close(a, b, rtol=1e-6, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


class _ListHandler(logging.Handler):
  def __init__(self, records):
    super().__init__(logging.DEBUG)
    self.records = records

  def emit(self, record):
    self.records.append(record.getMessage())


@contextlib.contextmanager
def count_compilations():
  """Yields a list that ends up holding one message per XLA compilation inside the block."""
  messages = []
  handler = _ListHandler(messages)
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  compiled = []
  try:
    with jax.log_compiles():
      yield compiled
  finally:
    logger.removeHandler(handler)
    compiled.extend(m for m in messages if re.search(r"Finished .* compilation", m))


# ------------------------------------------------------------------------------------------------
# Minimisation (alias_test / contrib _common_test "test_optimization").


def _check_measurements(name: str, problem: Problem, params, state) -> None:
  """Each transform's measurement at the end, against the same quantity computed densely."""
  s = kstep.stats(state)
  batch = problem.batch()
  hessian = jax.hessian(problem.loss_fn)(params, batch)
  jac = jax.jacobian(problem.outputs)(params)
  if name == "track_lambda_max":
    np.testing.assert_allclose(s["lambda_max"], np.linalg.eigvalsh(hessian)[-1], rtol=2e-3)
  elif name == "track_k":
    np.testing.assert_allclose(s["k_trace"], np.sum(np.square(jac)), rtol=2e-3)
  elif name == "track_batch_sharpness":
    eig = np.linalg.eigvalsh(hessian)
    assert eig[0] * (1 - 1e-3) <= float(s["batch_sharpness"]) <= eig[-1] * (1 + 1e-3)
    if problem is PARABOLA:  # H = 2 I: every direction has curvature 2
      np.testing.assert_allclose(s["batch_sharpness"], 2.0, rtol=1e-5)
  elif name == "k_controlled_adam":
    # Σ J²/P with Adam's P = √v̂ + ε at the end, floored at 0.1 of its mean (kstep's rule); the
    # smoothed trace lags P's slow drift, hence the tolerance.
    adam = state.preconditioner
    p = np.sqrt(np.asarray(adam.nu, np.float64) / (1 - 0.999 ** int(adam.count))) + 1e-8
    p = np.maximum(p, 0.1 * p.mean())
    np.testing.assert_allclose(s["k_trace"], np.sum(np.square(jac) / p), rtol=0.1)
    # K_P within Adam's MSE band, whose top (1.1) sits above SGD's K < 1.
    top = kstep._src.options.ADAPTIVE_TARGETS["per_output"][1]
    assert 0 < float(s["k"]) <= top * (1 + 1e-6) and int(s["k_num_skipped"]) == 0
  else:
    np.testing.assert_allclose(s["k_trace"], np.sum(np.square(jac)), rtol=0.05)
    assert 0 < float(s["k"]) < 1 and int(s["k_num_skipped"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("name", NAMES)
def test_minimises_parabola_and_rosenbrock(name, problem):
  opt = make(name, problem)
  params = problem.params()
  state = opt.init(params)
  state = optax.tree.map_params(opt, lambda v: v, state)  # a no-op map must keep the state
  params, state = train(opt, problem, params, state, problem.steps)
  np.testing.assert_allclose(params, problem.solution, rtol=3e-2, atol=3e-2)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(measured(kstep.stats(state))))
  _check_measurements(name, problem, params, state)


@pytest.mark.parametrize("name", NAMES)
def test_init_accepts_abstract_params(name):
  params = jax.ShapeDtypeStruct((3,), jnp.float32)
  state = make(name).init(params)
  assert avals(state) == avals(make(name).init(PARABOLA.params()))


# ------------------------------------------------------------------------------------------------
# Extra keyword arguments, compilation (test_optimizers_accept_extra_args).


@pytest.mark.parametrize("name", NAMES)
def test_accepts_unknown_keyword_arguments_and_compiles_once(name):
  opt = make(name, ROSENBROCK)
  step = jax.jit(step_fn(opt, ROSENBROCK, unexpected_extra_args_your_optimizer_doesnt_expect=1))
  params, batch = ROSENBROCK.params(), ROSENBROCK.batch()
  state = opt.init(params)
  params, state, _ = step(params, state, batch)
  with count_compilations() as compiled:
    for _ in range(EVERY + 1):  # a measuring step and the steps between
      params, state, _ = step(params, state, batch)
  assert compiled == []
  assert step._cache_size() == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, measured(state))))


# ------------------------------------------------------------------------------------------------
# inject_hyperparams (test_optimizers_can_be_wrapped_in_inject_hyperparams).


def _inner(name, state):
  return state.inner_state if name in CONTROLLERS else (state[0], state[1].inner_state)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_equals_plain(name):
  """optax's own wrapper, given the static arguments kstep lists (``kstep.inject_hyperparams``
  does the same in one call: tests/test_hyperparams.py)."""
  wrap = lambda f: optax.inject_hyperparams(
      f, static_args=tuple(kstep._src.hyperparams.static_arg_names(f)))
  injected = make(name, wrap=wrap)
  params, batch = PARABOLA.params(), PARABOLA.batch()
  grads = jax.grad(PARABOLA.loss_fn)(params, batch)
  updates, state = first_update(name)
  i_state = jax.jit(injected.init)(params)
  i_updates, i_state = jax.jit(injected.update)(grads, i_state, params, batch=batch)
  # Adam's β₂ as a float32 array instead of a Python float moves its bias correction by ~1e-5
  # (optax.adam itself: 7e-6 here).
  rtol = 3e-5 if name == "k_controlled_adam" else 1e-6
  assert_trees_close(i_updates, updates, rtol=rtol)
  assert jax.tree.structure(_inner(name, i_state)) == jax.tree.structure(state)
  assert_trees_close(_inner(name, i_state), state, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# dtypes (test_preserve_dtype, test_state_shape_dtype_shard_stability).

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_kept_and_state_stable_through_lax_cond(name, dtype):
  """Updates keep the params' dtype and the state its shapes and dtypes. As in optax, the update
  runs in one branch of a jitted ``lax.cond`` whose other branch returns the params (as updates)
  and the old state, so any change of shape, dtype or weak type fails to trace."""
  opt = make(name)
  step = step_fn(opt, PARABOLA)
  coin = lambda: jax.random.randint(jax.random.key(0), (), 0, 2) == 0

  @jax.jit
  def guarded_step(params, state, batch):
    def update():
      _, new_state, updates = step(params, state, batch)
      return updates, new_state

    updates, state = jax.lax.cond(coin(), update, lambda: (params, state))
    return optax.apply_updates(params, updates), state, updates

  params, batch = PARABOLA.params(dtype), PARABOLA.batch(dtype)
  assert jax.grad(PARABOLA.loss_fn)(params, batch).dtype == dtype
  state0 = state = opt.init(params)
  assert avals(jax.jit(opt.init)(params)) == avals(state0)  # jitted and eager init agree
  for _ in range(2):
    params, new_state, updates = guarded_step(params, state, batch)
    assert params.dtype == updates.dtype == dtype
    assert avals(new_state) == avals(state0)
    state = jax.lax.cond(coin(), lambda: state, lambda: new_state)  # noqa: B023
  assert bool(jnp.all(jnp.isfinite(params)))


# ------------------------------------------------------------------------------------------------
# Wrappers: MultiSteps (test_gradient_accumulation) and apply_if_finite.


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_multi_steps(name):
  """Three zero updates, then the plain optimizer's first update on the mean gradient; in
  bfloat16, where a float32 accumulator or step would leak into the updates' dtype."""
  k, dtype = 4, jnp.bfloat16
  opt = optax.MultiSteps(make(name), every_k_schedule=k)
  params, batch = PARABOLA.params(dtype), PARABOLA.batch(dtype)
  grads = jax.grad(PARABOLA.loss_fn)(params, batch)
  update = jax.jit(opt.update)
  state = jax.jit(opt.init)(params)
  for _ in range(k - 1):
    updates, state = update(grads, state, params, batch=batch)
    np.testing.assert_array_equal(updates, jnp.zeros_like(grads))
    assert updates.dtype == dtype
  updates, state = update(grads, state, params, batch=batch)
  ref_updates, ref_state = first_update(name)
  assert updates.dtype == dtype
  tol = 1e-2
  assert_trees_close(updates, ref_updates, rtol=tol)
  # Same computation compiled inside MultiSteps' cond: float noise in near-zero stats (residuals).
  assert_trees_close(kstep.stats(state), kstep.stats(ref_state), rtol=tol, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite(name):
  """A NaN gradient is skipped (zero update, inner state untouched); the next finite one gives
  the plain optimizer's first update."""
  opt = optax.apply_if_finite(make(name), max_consecutive_errors=3)
  params, batch = PARABOLA.params(), PARABOLA.batch()
  grads = jax.grad(PARABOLA.loss_fn)(params, batch)
  update = jax.jit(opt.update)
  state0 = opt.init(params)
  updates, state1 = update(jnp.full_like(grads, jnp.nan), state0, params, batch=batch)
  np.testing.assert_array_equal(updates, jnp.zeros_like(grads))
  assert int(state1.notfinite_count) == 1 and not bool(state1.last_finite)
  assert_trees_close(state1.inner_state, state0.inner_state, rtol=0.0)
  updates, state2 = update(grads, state1, params, batch=batch)
  ref_updates, ref_state = first_update(name)
  assert int(state2.notfinite_count) == 0
  assert_trees_close(updates, ref_updates, rtol=1e-6)
  assert_trees_close(kstep.stats(state2), kstep.stats(ref_state), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Schedules (test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such).

SCHEDULED = NAMES


@pytest.mark.parametrize("name", SCHEDULED)
def test_learning_rate_is_annotated_as_a_schedule(name):
  """optax's schedule check reads ``inspect.signature``: a string annotation (``from __future__
  import annotations``) makes it skip the optimizer silently."""
  factory = spec(name, PARABOLA)[0]
  raw = inspect.signature(factory).parameters["learning_rate"].annotation
  assert not isinstance(raw, str), f"{name}: learning_rate annotation is the string {raw!r}"
  hint = typing.get_type_hints(factory)["learning_rate"]
  members = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else ()
  assert hint is optax.ScalarOrSchedule or (
      set(members) == set(typing.get_args(optax.ScalarOrSchedule)) | {type(None)})
  assert raw == hint


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULED)
def test_learning_rate_schedule_equals_the_constant(name):
  opt = make(name, learning_rate=optax.constant_schedule(LR))
  step = jax.jit(step_fn(opt, PARABOLA))
  params, batch = PARABOLA.params(), PARABOLA.batch()
  params, state, updates = step(params, opt.init(params), batch)
  ref_updates, ref_state = first_update(name)  # the same optimizer with the float LR
  assert_trees_close(updates, ref_updates, rtol=1e-6)
  assert_trees_close(kstep.stats(state), kstep.stats(ref_state), rtol=1e-6, atol=1e-6)
  start = PARABOLA.loss_fn(params, batch)
  for _ in range(10):
    params, state, _ = step(params, state, batch)
  assert float(PARABOLA.loss_fn(params, batch)) < float(start)
  assert step._cache_size() == 1


# ------------------------------------------------------------------------------------------------
# optax.tree.get of every stat (kstep.stats promises it).


@pytest.mark.parametrize("wrapped", ["plain", "inject_hyperparams"])
@pytest.mark.parametrize("name", NAMES)
def test_tree_get_finds_every_stat(name, wrapped):
  wrap = kstep.inject_hyperparams if wrapped == "inject_hyperparams" else (lambda f: f)
  state = make(name, wrap=wrap).init(PARABOLA.params())  # the fields are there from init on
  subs = kstep_states(state)
  assert len(subs) == 1
  for field in type(subs[0]).STATS_FIELDS:
    try:
      value = optax.tree.get(state, field)
    except (KeyError, ValueError) as err:
      pytest.fail(f"optax.tree.get(state, {field!r}) of {name} ({wrapped}): {err}")
    assert value is not None, f"optax.tree.get(state, {field!r}) found nothing"
    np.testing.assert_array_equal(value, getattr(subs[0], field))
