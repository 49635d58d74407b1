"""Data-parallel cases on 8 simulated CPU devices; run by tests/test_data_parallel.py.

This file needs ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX is
imported, so it runs in its own pytest process (its name keeps the main run from collecting it):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice_cases.py

Every sharded result is compared with the same computation on one device holding the whole batch:
under ``jax.jit`` with a ``NamedSharding``-sharded batch (params replicated or FSDP-sharded), and
inside ``jax.shard_map`` (both ``check_vma`` modes) and ``jax.pmap`` with ``axis_name``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_example
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kstep

NDEV = 8
B, D, C = 32, 8, 4
RTOL = 1e-5

if jax.device_count() != NDEV:
  pytest.skip(
      f"needs {NDEV} devices (XLA_FLAGS=--xla_force_host_platform_device_count={NDEV}); "
      "tests/test_data_parallel.py runs this file in its own process",
      allow_module_level=True,
  )

# Auto axes: the compiler propagates shardings (GSPMD), as in the classic jit + NamedSharding setup.
AUTO = (jax.sharding.AxisType.Auto,)
MESH = jax.make_mesh((NDEV,), ("data",), axis_types=AUTO)
REPLICATED = NamedSharding(MESH, P())
DATA = NamedSharding(MESH, P("data"))
NAMED_LOSSES = ("mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy")


def init_mlp(key, sizes=(D, 16, 16, C)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [
      {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": 0.1 * jax.random.normal(k, (b,))}
      for k, a, b in zip(keys, sizes[:-1], sizes[1:])
  ]


def apply_mlp(params, batch):
  h = batch["x"]
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return h


def mse_loss(params, batch):
  return jnp.mean(0.5 * jnp.sum(jnp.square(apply_mlp(params, batch) - batch["y"]), -1))


def callable_loss(outputs, batch):
  """Per-example MSE averaged over classes (H = I/C), given as a callable."""
  return jnp.mean(jnp.square(outputs - batch["y"]), -1)


def make_batch(seed=1, n=B):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return {"x": jax.random.normal(kx, (n, D)), "y": jax.random.normal(ky, (n, C))}


def fsdp(params):
  """Params sharded on their first axis over the data axis where it divides (FSDP-style)."""
  spec = lambda x: P("data") if x.shape[0] % NDEV == 0 else P()
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(MESH, spec(x))), params)


PARAM_LAYOUTS = {"replicated": lambda p: jax.device_put(p, REPLICATED), "fsdp": fsdp}


@pytest.fixture(scope="module")
def params():
  return init_mlp(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def batch():
  return make_batch()


def close(a, b, rtol=RTOL, atol=0.0):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def smap(fn, *, check_vma=True, in_specs=(P(), P("data")), out_specs=P()):
  return jax.jit(
      jax.shard_map(fn, mesh=MESH, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
  )


def trace_fn(loss, method, **kw):
  key = jax.random.PRNGKey(7)
  return lambda p, b: kstep.gauss_newton_trace(
      apply_mlp, p, b, loss=loss, key=key, num_probes=4, method=method, **kw
  )


LOSSES = NAMED_LOSSES + (callable_loss,)


# ----------------------------------------------------------------------------------------------
# Estimators.


@pytest.mark.parametrize("layout", sorted(PARAM_LAYOUTS))
@pytest.mark.parametrize("method", ["hutchinson", "exact"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda x: getattr(x, "__name__", x))
def test_trace_jit_sharded_equals_single_device(params, batch, loss, method, layout):
  ref = jax.jit(trace_fn(loss, method))(params, batch)
  got = jax.jit(trace_fn(loss, method))(PARAM_LAYOUTS[layout](params), jax.device_put(batch, DATA))
  assert got.value.sharding.is_fully_replicated
  close(got.value, ref.value)
  if method == "hutchinson":
    close(got.stderr, ref.stderr, rtol=1e-4)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("method", ["hutchinson", "exact"])
@pytest.mark.parametrize("loss", LOSSES, ids=lambda x: getattr(x, "__name__", x))
def test_trace_shard_map_equals_single_device(params, batch, loss, method, check_vma):
  ref = jax.jit(trace_fn(loss, method))(params, batch)
  fn = smap(trace_fn(loss, method, axis_name="data"), check_vma=check_vma)
  got = fn(jax.device_put(params, REPLICATED), jax.device_put(batch, DATA))
  close(got.value, ref.value)


def test_trace_pmap_equals_single_device(params, batch):
  ref = jax.jit(trace_fn("softmax_cross_entropy", "hutchinson"))(params, batch)
  shards = jax.tree.map(lambda x: x.reshape(NDEV, B // NDEV, *x.shape[1:]), batch)
  fn = jax.pmap(
      trace_fn("softmax_cross_entropy", "hutchinson", axis_name="data"), axis_name="data",
      in_axes=(None, 0),
  )
  got = fn(params, shards)
  close(got.value, np.full(NDEV, ref.value))


def test_trace_over_a_tuple_of_axes(params, batch):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=AUTO * 2)
  ref = jax.jit(trace_fn("mse", "hutchinson"))(params, batch)
  fn = jax.jit(jax.shard_map(
      trace_fn("mse", "hutchinson", axis_name=("data", "model")), mesh=mesh,
      in_specs=(P(), P(("data", "model"))), out_specs=P(),
  ))
  got = fn(params, jax.device_put(batch, NamedSharding(mesh, P(("data", "model")))))
  close(got.value, ref.value)


@pytest.mark.parametrize("loss", NAMED_LOSSES)
def test_per_shard_probes_are_unbiased_with_lower_variance(params, batch, loss):
  """Brute-force Monte Carlo over 2,000 probes against the exact trace; per-shard variance is
  below the global probes' (it drops the cross-device cross terms)."""
  exact = jax.jit(trace_fn(loss, "exact"))(params, batch).value
  n = 2000

  def samples(scope):
    fn = lambda p, b: kstep.gauss_newton_trace(
        apply_mlp, p, b, loss=loss, key=jax.random.PRNGKey(3), num_probes=n, chunk_size=250,
        axis_name="data", probe_scope=scope,
    )
    est = smap(fn)(jax.device_put(params, REPLICATED), jax.device_put(batch, DATA))
    return float(est.value), float(est.stderr)

  (g_mean, g_se), (s_mean, s_se) = samples("global"), samples("per_shard")
  assert abs(g_mean - exact) < 4 * g_se
  assert abs(s_mean - exact) < 4 * s_se
  assert s_se < g_se
  assert s_mean != g_mean


def test_per_shard_needs_axis_name():
  with pytest.raises(ValueError, match="per_shard.*axis_name"):
    kstep.k_controlled_sgd(0.1, batch_size=B, apply_fn=apply_mlp,
                           estimate=kstep.Estimate(probe_scope="per_shard"))
  with pytest.raises(ValueError, match="probe_scope"):
    kstep.track_k(apply_mlp, batch_size=B, learning_rate=0.1, probe_scope="shard")


def lmax_fn(**kw):
  return lambda p, b: kstep.lambda_max(mse_loss, p, b, num_iters=40, tol=1e-6, **kw).value


@pytest.mark.parametrize("layout", sorted(PARAM_LAYOUTS))
def test_lambda_max_sharded_equals_single_device(params, batch, layout):
  ref = jax.jit(lmax_fn())(params, batch)
  got = jax.jit(lmax_fn())(PARAM_LAYOUTS[layout](params), jax.device_put(batch, DATA))
  close(got, ref)
  sm = smap(lmax_fn(axis_name="data"))(jax.device_put(params, REPLICATED),
                                       jax.device_put(batch, DATA))
  close(sm, ref)
  dense = jax.hessian(lambda f: mse_loss(jax.flatten_util.ravel_pytree(params)[1](f), batch))(
      jax.flatten_util.ravel_pytree(params)[0]
  )
  close(ref, np.linalg.eigvalsh(np.asarray(dense, np.float64))[-1], rtol=1e-4)


def test_gauss_newton_lambda_max_shard_map(params, batch):
  fn = lambda **kw: lambda p, b: kstep.gauss_newton_lambda_max(
      apply_mlp, p, b, loss="softmax_cross_entropy", num_iters=40, tol=1e-6, **kw
  ).value
  ref = jax.jit(fn())(params, batch)
  got = smap(fn(axis_name="data"))(jax.device_put(params, REPLICATED), jax.device_put(batch, DATA))
  close(got, ref)


@pytest.mark.parametrize("reduction", ["ratio_of_means", "mean_of_ratios"])
def test_batch_sharpness_sharded_equals_single_device(params, reduction):
  batches = make_batch(seed=5, n=3 * B)
  batches = jax.tree.map(lambda x: x.reshape(3, B, *x.shape[1:]), batches)
  fn = lambda **kw: lambda p, b: kstep.batch_sharpness(
      mse_loss, p, b, reduction=reduction, **kw
  )
  ref = jax.jit(fn())(params, batches)
  sharded = NamedSharding(MESH, P(None, "data"))
  got = jax.jit(fn())(fsdp(params), jax.device_put(batches, sharded))
  close(got.value, ref.value)
  sm = smap(fn(axis_name="data"), in_specs=(P(), P(None, "data")))(
      jax.device_put(params, REPLICATED), jax.device_put(batches, sharded)
  )
  close(sm.value, ref.value)
  close(sm.curvature, ref.curvature)


# ----------------------------------------------------------------------------------------------
# Optimizer and diagnostics in training steps.


def make_opt(axis_name=None, lr=0.5):
  """The controller with the three diagnostics after it, each with its own name for K."""
  return optax.chain(
      kstep.k_controlled_sgd(lr, batch_size=B, apply_fn=apply_mlp, estimate=kstep.Estimate(every=2),
                             axis_name=axis_name),
      kstep.track_lambda_max(mse_loss, every=3, num_iters=10, axis_name=axis_name),
      kstep.track_batch_sharpness(mse_loss, every=2, learning_rate=lr, axis_name=axis_name),
  )


def make_track_k(axis_name=None):
  return kstep.track_k(
      apply_mlp, batch_size=B, learning_rate=0.5, every=2, loss="mse", axis_name=axis_name
  )


def jit_step(opt):
  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(mse_loss)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  return step


def shard_map_step(opt, check_vma=True):
  def step(params, state, batch):
    # The mean of the local gradients. Casting params to "varying" first keeps jax.grad local in
    # every mode (with check_vma=True it would otherwise sum over the devices implicitly).
    local = jax.tree.map(lambda x: jax.lax.pcast(x, "data", to="varying"), params)
    grads = jax.lax.pmean(jax.grad(mse_loss)(local, batch), "data")
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  return jax.jit(jax.shard_map(
      step, mesh=MESH, in_specs=(P(), P(), P("data")), out_specs=(P(), P()),
      check_vma=check_vma,
  ))


def place_state(step, params, state, batch):
  """The state moved to the shardings the jitted step gives it (compiled once, ahead of time):
  the next steps then take and return the same shardings and never recompile."""
  shardings = step.lower(params, state, batch).compile().output_shardings
  return jax.device_put(state, shardings[1])


def batches(steps=12):
  return [make_batch(seed=100 + t) for t in range(steps)]


def run(step, params, state, data, put=lambda b: b):
  with jax.transfer_guard("disallow"):
    for b in data:
      b = put(b)
      params, state = step(params, state, b)
  return params, state


def with_guard_put(b):
  with jax.transfer_guard("allow"):
    return jax.device_put(b, DATA)


def compare_runs(ref, got, rtol=1e-4, atol=1e-6):
  (p_ref, s_ref), (p_got, s_got) = ref, got
  jax.tree.map(lambda a, b: close(b, a, rtol=rtol, atol=atol), p_ref, p_got)
  st_ref, st_got = kstep.stats(s_ref), kstep.stats(s_got)
  assert set(st_ref) == set(st_got)
  for name in st_ref:
    close(st_got[name], st_ref[name], rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def single_device_run(params):
  opt = make_opt()
  return run(jit_step(opt), params, opt.init(params), batches())


@pytest.mark.parametrize("layout", sorted(PARAM_LAYOUTS))
def test_jit_training_sharded_batch_gives_single_device_params(params, single_device_run, layout):
  opt = make_opt()
  p0 = PARAM_LAYOUTS[layout](params)
  step = jit_step(opt)
  state = place_state(step, p0, opt.init(p0), jax.device_put(make_batch(), DATA))
  got = run(step, p0, state, batches(), with_guard_put)
  compare_runs(single_device_run, got)
  assert step._cache_size() == 1  # no recompilation after the first step


def sharded_equals_single_device(params, opt):
  """4 steps of ``opt`` (estimates at steps 0 and 2) on a sharded batch with FSDP params against
  one device: the same params and stats, compiled once; returns the sharded run's stats."""
  ref = run(jit_step(opt), params, opt.init(params), batches(4))
  step, p0 = jit_step(opt), fsdp(params)
  state = place_state(step, p0, opt.init(p0), jax.device_put(make_batch(), DATA))
  got = run(step, p0, state, batches(4), with_guard_put)
  compare_runs(ref, got)
  assert step._cache_size() == 1
  return kstep.stats(got[1])


def test_controller_steps_sharded_equal_single_device(params):
  """The smoke case of the default run: 4 controller steps (estimates at steps 0 and 2) on a
  sharded batch with FSDP params give the one-device params and stats (K, the trace, the
  guard's λ_max and sharpness ratio), compiled once. The probe sub-batch (every 4th example:
  one row per device) is the one-device sub-batch."""
  opt = kstep.k_controlled_sgd(0.5, batch_size=B, apply_fn=apply_mlp,
                               estimate=kstep.Estimate(every=2, probe_batch_size=8))
  stats = sharded_equals_single_device(params, opt)
  assert float(stats["k"]) > 0 and float(stats["gn_lambda_max"]) > 0


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_training_gives_single_device_params(params, single_device_run, check_vma):
  opt = make_opt(axis_name="data")
  p0 = jax.device_put(params, REPLICATED)
  state = jax.device_put(opt.init(params), REPLICATED)
  step = shard_map_step(opt, check_vma)
  got = run(step, p0, state, batches(), with_guard_put)
  compare_runs(single_device_run, got)
  assert step._cache_size() == 1


def test_track_k_sharded_equals_single_device(params):
  ref_opt = optax.chain(optax.sgd(0.5), make_track_k())
  sm_opt = optax.chain(optax.sgd(0.5), make_track_k("data"))
  ref = run(jit_step(ref_opt), params, ref_opt.init(params), batches(6))
  got = run(shard_map_step(sm_opt), jax.device_put(params, REPLICATED),
            jax.device_put(sm_opt.init(params), REPLICATED), batches(6), with_guard_put)
  compare_runs(ref, got)
  assert float(kstep.stats(got[1])["k"]) > 0


@pytest.mark.parametrize("probes", [1, 3])
def test_k_first_measurement_sharded_equals_single_device(params, probes):
  """K itself, at the first measurement (before any float drift of the params): 1e-5."""
  def k_after_one_step(step, p, state, put):
    _, state = run(step, p, state, batches(1), put)
    return kstep.stats(state)["k"]

  mk = lambda axis: optax.chain(optax.sgd(0.5), kstep.track_k(
      apply_mlp, batch_size=B, learning_rate=0.5, loss="softmax_cross_entropy",
      num_probes=probes, axis_name=axis))
  ref_opt, sm_opt, jit_opt = mk(None), mk("data"), mk(None)
  ref = k_after_one_step(jit_step(ref_opt), params, ref_opt.init(params), lambda b: b)
  rep = jax.device_put(params, REPLICATED)
  sm = k_after_one_step(shard_map_step(sm_opt), rep,
                        jax.device_put(sm_opt.init(params), REPLICATED), with_guard_put)
  step, p = jit_step(jit_opt), fsdp(params)
  state = place_state(step, p, jit_opt.init(p), jax.device_put(make_batch(), DATA))
  jt = k_after_one_step(step, p, state, with_guard_put)
  assert float(ref) > 0
  close(sm, ref)
  close(jt, ref)


@pytest.mark.parametrize("layout", sorted(PARAM_LAYOUTS))
def test_state_shardings_stable_across_steps(params, layout):
  opt = make_opt()
  p = PARAM_LAYOUTS[layout](params)
  step = jit_step(opt)
  state = place_state(step, p, opt.init(p), jax.device_put(make_batch(), DATA))
  shardings = lambda tree: [x.sharding for x in jax.tree.leaves(tree)]
  before = shardings((p, state))
  for b in batches(4):
    p, state = step(p, state, jax.device_put(b, DATA))
    assert shardings((p, state)) == before
  assert step._cache_size() == 1


def test_data_parallel_example_runs_and_matches_one_device():
  ex = load_example("data_parallel")
  result = ex.main(["--steps", "12", "--batch-size", "64", "--n-train", "2048", "--no-timing"])
  assert result["num_devices"] == NDEV
  assert result["max_param_rel_diff"] < 1e-4
  assert result["compilations"] == (1, 1)
  assert result["final_k"] > 0 and np.isfinite(result["final_loss"])


def make_adam(axis_name=None):
  return kstep.k_controlled_adam(0.01, batch_size=B, apply_fn=apply_mlp, axis_name=axis_name,
                                 estimate=kstep.Estimate(every=2, probe_batch_size=8))


def test_adam_controller_sharded_equals_single_device(params):
  """k_controlled_adam on a sharded batch with FSDP params (P read from Adam's sharded second
  moment) gives the one-device params and stats, compiled once."""
  stats = sharded_equals_single_device(params, make_adam())
  assert float(stats["k"]) > 0 and float(stats["gn_lambda_max"]) > 0


@pytest.mark.parametrize("check_vma", [True, False])
def test_adam_controller_shard_map_equals_single_device(params, check_vma):
  ref_opt = make_adam()
  ref = run(jit_step(ref_opt), params, ref_opt.init(params), batches(4))
  opt = make_adam(axis_name="data")
  step = shard_map_step(opt, check_vma)
  state = jax.device_put(opt.init(params), REPLICATED)
  got = run(step, jax.device_put(params, REPLICATED), state, batches(4), with_guard_put)
  compare_runs(ref, got)


# ----------------------------------------------------------------------------------------------
# Sequence logits (B, T, V) with cross-entropy: every position a row, rows offset by T per
# sequence on each shard.


def seq_apply(p, batch):
  h = jnp.tanh(p["e"][batch["x"]])
  return jnp.einsum("ts,bsd->btd", p["m"], h) @ p["w"] + h @ p["w"]


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("method", ["hutchinson", "exact"])
def test_sequence_trace_shard_map_equals_single_device(method, check_vma):
  t, v, d = 4, 5, 6
  params = {"e": jax.random.normal(jax.random.key(0), (v, d)),
            "w": 0.5 * jax.random.normal(jax.random.key(1), (d, v)),
            "m": 0.3 * jax.random.normal(jax.random.key(2), (t, t))}
  batch = {"x": jax.random.randint(jax.random.key(3), (2 * NDEV, t), 0, v)}

  def fn(axis_name=None):
    return lambda p, b: kstep.gauss_newton_trace(
        seq_apply, p, b, loss="softmax_cross_entropy", key=jax.random.PRNGKey(7),
        num_probes=4, method=method, axis_name=axis_name).value

  ref = jax.jit(fn())(params, batch)
  got = smap(fn("data"), check_vma=check_vma)(jax.device_put(params, REPLICATED),
                                               jax.device_put(batch, DATA))
  close(got, ref)
  close(jax.jit(fn())(params, jax.device_put(batch, DATA)), ref)
