"""Shared model, runners and checks of the K controller's tests (``tests/test_control_*.py``).

Most tests use a linear model ``f = s · x W`` (``s`` a per-example scale read from the batch): its
Jacobian does not depend on ``W``, so the exact MSE trace is known in closed form,
``T = C · mean_i s_i² ‖x_i‖²``, and the scale lets a test move the trace (or make it NaN, Inf or
0) at will.

The tests of the band law use ``LAW``: K on the total trace (``Estimate(output_norm="total")``, so
``K = η T / (2 α B)``), the curvature guard off and the band (0.4, 0.8) given explicitly, so that
the closed forms hold exactly. ``EXACT`` is that estimate with exact per-example traces.

Not a test module (its name keeps pytest from collecting it): import it as
``from control_helpers import ...``, as the other tests import ``conftest``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kstep

C = 3  # outputs
D = 5  # inputs
B = 8  # batch size
BAND = (0.4, 0.8)
# The old law, exactly: no curvature guard, the band given (and K on the total trace: every
# estimate of the law says output_norm="total", as EXACT does).
LAW = {"guard": None, "target": BAND}
EXACT = kstep.Estimate(output_norm="total", estimator="exact")
# Stats that are NaN until their first valid estimate (the guard's: always, with the guard off).
MEASURED = ("k", "k_scale", "k_trace", "k_trace_raw")
GUARD_STATS = ("gn_lambda_max", "sharpness_ratio", "sharpness_growth")


# ------------------------------------------------------------------------------------------------
# The linear model


def linear_apply(params, batch):
  return batch["scale"] * (batch["x"] @ params["w"])


def mse_loss(params, batch, apply_fn=linear_apply):
  out = apply_fn(params, batch)
  return 0.5 * jnp.mean(jnp.sum(jnp.square(out - batch["y"]), axis=-1))


def make_batch(seed, scale=1.0, n=B, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D)).astype(np.float32)
  y = rng.normal(size=(n, C)).astype(np.float32)
  return {
      "x": jnp.asarray(x, dtype), "y": jnp.asarray(y, dtype),
      "scale": jnp.full((n, 1), scale, dtype),
  }


def exact_trace(batch):
  """Exact per-example MSE (NTK) trace of ``linear_apply``, in float64."""
  x = np.asarray(batch["x"], np.float64)
  s = np.asarray(batch["scale"], np.float64)[:, 0]
  return C * np.mean(s**2 * np.sum(x**2, axis=-1))


def eta_one(trace, momentum, batch_size=B):
  """The step at which K = 1: 2 (1 − μ) B / T."""
  return 2.0 * (1.0 - momentum) * batch_size / trace


def init_params(seed=0, dtype=jnp.float32):
  w = np.random.default_rng(100 + seed).normal(size=(D, C)) / np.sqrt(D)
  return {"w": jnp.asarray(w, dtype)}


def smoothed(raw, smoothing=0.8, max_change=4.0):
  """The documented smoothing: the first estimate sets T̄, then an EMA of clipped estimates."""
  trace = raw[0]
  for r in raw[1:]:
    trace = smoothing * trace + (1 - smoothing) * np.clip(r, trace / max_change, trace * max_change)
  return trace


def controller(learning_rate, **kwargs):
  """``kstep.k_controlled_sgd`` on the linear model with ``LAW``, B given and ``EXACT`` (each
  overridden by ``kwargs``)."""
  kwargs.setdefault("batch_size", B)
  kwargs.setdefault("apply_fn", linear_apply)
  kwargs.setdefault("estimate", EXACT)
  return kstep.k_controlled_sgd(learning_rate, **{**LAW, **kwargs})


# ------------------------------------------------------------------------------------------------
# Runners


def make_step(opt, loss=mse_loss):
  """A jitted training step; gradients on ``grad_batch``, the controller sees ``batch``."""

  @jax.jit
  def step(params, state, batch, grad_batch):
    grads = jax.grad(loss)(params, grad_batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, updates

  return step


def run(opt, params, batches, loss=mse_loss):
  """Runs ``opt`` over ``batches``; returns final params, state and the stats after each step."""
  step = make_step(opt, loss)
  state = opt.init(params)
  history = []
  for batch in batches:
    params, state, _ = step(params, state, batch, batch)
    history.append({k: np.asarray(v) for k, v in jax.device_get(kstep.stats(state)).items()})
  return params, state, history


def scan_train(opt, loss=mse_loss):
  """``train(params, stacked_batches)``: ``lax.scan`` over steps in one jit; returns final params,
  state and the stats after every step (stacked)."""

  @jax.jit
  def train(params, batches):
    def body(carry, batch):
      params, state = carry
      grads = jax.grad(loss)(params, batch)
      updates, state = opt.update(grads, state, params, batch=batch)
      return (optax.apply_updates(params, updates), state), kstep.stats(state)

    (params, state), history = jax.lax.scan(body, (params, opt.init(params)), batches)
    return params, state, history

  return train


def stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# ------------------------------------------------------------------------------------------------
# The control law's runs, on the linear model with exact traces.
#
# One jitted run serves many tests: the base LR and the band ends are per-step arrays read by
# schedules, the numeric knobs are traced arguments (the ints that say when estimates run are
# static), and the batch's scale at step t is ``scales[t]`` (the exact trace is then
# ``scales[t]² · T0``). Gradients always come from the clean batch (scale 1), so a NaN scale
# poisons only the trace estimate.

NUM_STEPS = 12
BASE_BATCH = make_batch(0)
T0 = exact_trace(BASE_BATCH)


@functools.partial(jax.jit, static_argnames=("estimator", "loss", "output_norm", "guard", "every",
                                             "refresh_every"))
def linear_run(
    learning_rates, scales, lo=BAND[0], hi=BAND[1], *, momentum=0.9, smoothing=0.8,
    max_change=4.0, every=1, max_scale=np.inf, seed=0, estimator="exact", loss="mse",
    output_norm="total", guard=False, refresh_every=1,
):
  num_probes = 64  # for "hutchinson"; cheap on this model
  steps = jnp.arange(NUM_STEPS)
  at = lambda values: (lambda count: jnp.broadcast_to(values, (NUM_STEPS,))[count])
  opt = kstep.k_controlled_sgd(
      at(learning_rates), batch_size=B, apply_fn=linear_apply, loss=loss, target=(at(lo), at(hi)),
      momentum=momentum, max_scale=max_scale,
      estimate=kstep.Estimate(every=every, num_probes=num_probes, estimator=estimator,
                              output_norm=output_norm, smoothing=smoothing, max_change=max_change,
                              seed=seed),
      guard=kstep.Guard(ratio=0.5, refresh_every=refresh_every) if guard else None,
  )
  params = init_params()

  def body(carry, t):
    params, state = carry
    batch = dict(BASE_BATCH, scale=jnp.full((B, 1), scales[t], jnp.float32))
    grads = jax.grad(mse_loss)(params, BASE_BATCH)
    updates, state = opt.update(grads, state, params, batch=batch)
    return (optax.apply_updates(params, updates), state), kstep.stats(state)

  (params, state), history = jax.lax.scan(body, (params, opt.init(params)), steps)
  return (params, state), history


def run_linear(learning_rates, scales=1.0, lo=BAND[0], hi=BAND[1], **kwargs):
  """``linear_run`` with scalars broadcast to per-step arrays; returns ((params, state),
  history). ``output_norm="total"`` and the guard off unless given (``guard=True``: a
  ``Guard(ratio=0.5, refresh_every=refresh_every)``)."""
  full = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (NUM_STEPS,))
  final, history = linear_run(full(learning_rates), full(scales), full(lo), full(hi), **kwargs)
  return final, jax.tree.map(np.asarray, history)


# ------------------------------------------------------------------------------------------------
# A small MLP (classification and regression tests)


def mlp_init(seed, sizes):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
  return [
      {"w": jax.random.normal(k, (i, o)) * jnp.sqrt(2.0 / i), "b": jnp.zeros((o,))}
      for k, (i, o) in zip(keys, zip(sizes[:-1], sizes[1:]))
  ]


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def mlp_apply(params, batch):
  return mlp(params, batch["x"])


# ------------------------------------------------------------------------------------------------
# Checks


def assert_trees_equal(a, b):
  """Bitwise equality of two pytrees (structure, dtypes and values)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def avals(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x), jax.typeof(x).weak_type), tree)


def all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def assert_stats_finite(stats, guard, floor=False):
  """Every stat (one step's or a stacked history's) is finite, except the documented NaNs:
  ``MEASURED`` before the first valid estimate, ``k_trace_stderr`` before the second, the guard's
  stats with the guard off (always) or before its first valid λ estimate (``sharpness_growth``:
  its second), ``k_ntk_scale`` without a trace floor (always) or before the first valid
  estimate; and those are NaN."""
  n = np.asarray(stats["k_num_estimates"])
  lam_seen = np.isfinite(np.asarray(stats["gn_lambda_max"]))  # checked below when guard is off
  assert set(stats) == set(kstep.ScaleByKControlState.STATS_FIELDS)
  for name, value in stats.items():
    v = np.asarray(value)
    if (name in GUARD_STATS and not guard) or (name == "k_ntk_scale" and not floor):
      assert np.all(np.isnan(v)), name
      continue
    if name in MEASURED or name == "k_ntk_scale":
      defined = n >= 1
    elif name == "k_trace_stderr":
      defined = n >= 2
    elif name == "sharpness_growth":
      defined = np.asarray(stats["sharpness_num_estimates"]) >= 2
    elif name in GUARD_STATS:
      defined = lam_seen
    else:
      defined = np.ones(v.shape, bool)
    assert np.all(np.isfinite(v[defined])), (name, v)
    assert np.all(np.isnan(v[~defined])), (name, v)


def control_state(state):
  """The ``ScaleByKControlState`` inside an optimizer state (exactly one)."""
  found = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, kstep.ScaleByKControlState))
      if isinstance(x, kstep.ScaleByKControlState)]
  assert len(found) == 1
  return found[0]


def assert_state_finite(state, guard, floor=False):
  """``assert_stats_finite`` for the controller's stats in ``state``; every other float leaf of
  ``state`` (momentum, the smoothed variance, the guard's vector, ...) finite."""
  inner = control_state(state)
  assert_stats_finite(kstep.stats(state), guard, floor)
  rest = [x for x in jax.tree.leaves(state, is_leaf=lambda x: x is inner) if x is not inner]
  assert all_finite(rest)
  assert all_finite(inner._replace(**{name: 0.0 for name in inner.STATS_FIELDS}))


def diverges_on_quadratic(opt, lam: float, steps: int = 3000) -> bool:
  """Whether ``opt`` (an optax transformation) leaves |θ| < 1 after ``steps`` updates on
  f(θ) = λθ²/2 from θ = 1 (float64 where x64 is enabled): the curvature edge checks."""
  theta = jnp.ones((), jnp.float64) if jax.config.jax_enable_x64 else jnp.ones(())
  state = opt.init(theta)

  def body(carry, _):
    th, st = carry
    u, st = opt.update(lam * th, st, th)
    return (th + u, st), None

  (theta, _), _ = jax.lax.scan(body, (theta, state), None, length=steps)
  return not bool(jnp.abs(theta) < 1.0)


def sequence_model():
  """A causal-ish toy sequence model: (B, T) tokens -> (B, T, V) logits, positions mixed."""
  b, t, v, d = 3, 4, 5, 6
  params = {"e": jax.random.normal(jax.random.key(0), (v, d)),
            "w": 0.5 * jax.random.normal(jax.random.key(1), (d, v)),
            "m": 0.3 * jax.random.normal(jax.random.key(2), (t, t))}

  def apply_fn(p, batch):
    h = jnp.tanh(p["e"][batch["x"]])
    return jnp.einsum("ts,bsd->btd", p["m"], h) @ p["w"] + h @ p["w"]

  return apply_fn, params, {"x": jax.random.randint(jax.random.key(3), (b, t), 0, v)}


def dense_per_token_trace(apply_fn, params, batch):
  """(1/(B·T)) Σ_{b,t} tr(J_btᵀ H_bt J_bt) from the dense Jacobian of every position."""
  import jax.flatten_util  # noqa: F401

  flat, unravel = jax.flatten_util.ravel_pytree(params)
  jac = jax.jacrev(lambda f: apply_fn(unravel(f), batch))(flat)  # (B, T, V, P)
  p = jax.nn.softmax(apply_fn(params, batch), -1)
  h = jax.vmap(jax.vmap(jnp.diag))(p) - p[..., :, None] * p[..., None, :]
  return float(jnp.einsum("btvp,btvw,btwp->", jac, h, jac)) / (p.shape[0] * p.shape[1])
