"""Tests of kstep._src.k_estimate: the sub-batch, the shared-VJP trace pair, the power steps."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import kstep
from kstep._src import k_estimate, losses
from kstep._src.estimators import linearization, traces

C, D, B = 4, 6, 16


def mlp(params, batch):
  return jnp.tanh(batch["x"] @ params["w0"]) @ params["w1"]


rng = np.random.default_rng(0)
PARAMS = {"w0": jnp.asarray(rng.normal(size=(D, 12)) / np.sqrt(D), jnp.float32),
          "w1": jnp.asarray(3 * rng.normal(size=(12, C)) / np.sqrt(12), jnp.float32)}
BATCH = {"x": jnp.asarray(rng.normal(size=(B, D)), jnp.float32)}


@pytest.mark.slow
def test_probe_rows_strided_and_unbiased_for_the_batch_trace():
  with_scalar = {**BATCH, "lr": jnp.float32(0.1)}
  sub = k_estimate.probe_rows(mlp, PARAMS, with_scalar, 4)
  np.testing.assert_array_equal(sub["x"], BATCH["x"][::4])
  assert sub["lr"] is with_scalar["lr"]  # not an example leaf: whole
  assert k_estimate.probe_rows(mlp, PARAMS, BATCH, None) is BATCH
  assert k_estimate.probe_rows(mlp, PARAMS, BATCH, 64) is BATCH
  # The mean of the exact traces of the 4 strided sub-batches (offsets 0..3) is the batch's.
  full = kstep.ntk_trace(mlp, PARAMS, BATCH, method="exact").value
  subs = [kstep.ntk_trace(mlp, PARAMS, {"x": BATCH["x"][o::4]}, method="exact").value
          for o in range(4)]
  np.testing.assert_allclose(np.mean(subs), full, rtol=1e-5)


def test_trace_pair_from_one_batched_vjp_is_unbiased():
  ce = losses.resolve_loss("softmax_cross_entropy")
  mse = losses.resolve_loss("mse")
  lin = linearization.linearize(mlp, PARAMS, BATCH)
  gn, ntk = jax.jit(lambda k: traces.hutchinson_traces(lin, (ce, mse), BATCH, key=k,
                                                       num_probes=4000))(jax.random.PRNGKey(1))
  for est, loss in ((gn, "softmax_cross_entropy"), (ntk, "mse")):
    exact = kstep.gauss_newton_trace(mlp, PARAMS, BATCH, loss=loss, method="exact").value
    assert abs(est.value - exact) < 3.5 * est.stderr, (loss, est, exact)
    assert est.stderr < 0.1 * exact


@pytest.mark.slow
def test_power_steps_converge_to_the_gauss_newton_top_eigenvalue():
  lin = linearization.linearize(mlp, PARAMS, BATCH)
  mse = losses.resolve_loss("mse")
  ref = kstep.gauss_newton_lambda_max(mlp, PARAMS, BATCH, num_iters=40).value
  v = jax.tree.map(jnp.ones_like, PARAMS)
  lam, v = k_estimate.gauss_newton_power(lin, mse, BATCH, v, 30)
  np.testing.assert_allclose(lam, ref, rtol=1e-3)
  lam1, _ = k_estimate.gauss_newton_power(lin, mse, BATCH, v, 1)  # warm: one step suffices
  np.testing.assert_allclose(lam1, ref, rtol=1e-3)
  cold, _ = k_estimate.gauss_newton_power(lin, mse, BATCH, jax.tree.map(jnp.ones_like, PARAMS), 1)
  assert cold < ref  # a Rayleigh quotient never overshoots


def _dense_gauss_newton(loss_name):
  """G = (1/B) Σ_i J_iᵀ H_i J_i from the dense Jacobian and the loss's output Hessians."""
  flat, unravel = jax.flatten_util.ravel_pytree(PARAMS)
  jac = jax.jacobian(lambda f: mlp(unravel(f), BATCH))(flat)  # (B, C, P)
  spec = losses.resolve_loss(loss_name).for_output_shape((B, C))
  h = spec.hessian(mlp(PARAMS, BATCH), BATCH)  # (B, C, C)
  return jnp.einsum("icp,icd,idq->pq", jac, h, jac) / B, flat, unravel


@pytest.mark.parametrize("loss_name", [pytest.param("mse", marks=pytest.mark.slow),
                                       "softmax_cross_entropy"])
def test_estimate_power_steps_and_probes_match_dense_and_separate_passes(loss_name):
  spec = losses.resolve_loss(loss_name)
  mse = losses.resolve_loss("mse")
  g, flat, unravel = _dense_gauss_newton(loss_name)
  v = unravel(jnp.asarray(rng.normal(size=flat.shape), jnp.float32))
  key = jax.random.PRNGKey(3)
  est = jax.jit(lambda v: k_estimate.estimate(
      mlp, PARAMS, BATCH, loss=spec, key=key, output_norm="total", trace_floor=0.03,
      eigenvector=v, power_iters=2))(v)
  # Two power steps on the dense G, u ← G u / ‖G u‖ from v̂; λ = uᵀ G u of the last u, v' = u.
  u = jax.flatten_util.ravel_pytree(v)[0]
  u = u / jnp.linalg.norm(u)
  for _ in range(2):
    u = g @ u
    u = u / jnp.linalg.norm(u)
  np.testing.assert_allclose(est.lambda_max, u @ g @ u, rtol=1e-4)
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(est.eigenvector)[0], u,
                             rtol=1e-3, atol=1e-5)
  # The probes: the same numbers as the separate trace pair with the same key.
  lin = linearization.linearize(mlp, PARAMS, BATCH)
  gn, ntk = jax.jit(lambda k: traces.hutchinson_traces(lin, (spec, mse), BATCH, key=k))(
      jax.random.split(key, 2)[0])
  np.testing.assert_allclose(est.trace, gn.value, rtol=1e-5)
  np.testing.assert_allclose(est.scale, jnp.maximum(gn.value, 0.03 * ntk.value), rtol=1e-5)


def test_power_update_keeps_the_vector_where_the_product_is_not_finite():
  u = {"a": jnp.asarray([0.6, 0.0]), "b": jnp.asarray([0.8])}
  w = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([0.0])}
  new, quotient = k_estimate.power_update(u, w)
  np.testing.assert_allclose(np.concatenate([new["a"], new["b"]]), [0.6, 0.8, 0.0], rtol=1e-6)
  np.testing.assert_allclose(quotient, 0.6 * 3.0, rtol=1e-6)
  bad_products = [{"a": jnp.asarray([3.0, bad]), "b": jnp.asarray([0.0])}
                  for bad in (jnp.nan, jnp.inf, -jnp.inf)] + [jax.tree.map(jnp.zeros_like, w)]
  for w_bad in bad_products:
    kept, _ = k_estimate.power_update(u, w_bad)
    for leaf, old in zip(jax.tree.leaves(kept), jax.tree.leaves(u)):
      np.testing.assert_array_equal(leaf, old)
  # A product whose squares overflow float32 (each entry finite, the norm not) is refused too.
  kept, _ = k_estimate.power_update(u, {"a": jnp.asarray([3e38, 3e38]), "b": jnp.asarray([1.0])})
  np.testing.assert_array_equal(kept["a"], u["a"])


@pytest.mark.parametrize("output_norm", ["total", "max_output"])
def test_one_at_a_time_estimate_matches_its_probes_and_dense_power_steps(output_norm):
  """The first estimate's form: each probe and power step with its own forward pass."""
  spec = losses.resolve_loss("softmax_cross_entropy")
  mse = losses.resolve_loss("mse")
  rows = {"x": BATCH["x"][::2]}
  flat, unravel = jax.flatten_util.ravel_pytree(PARAMS)
  jac = jax.jacobian(lambda f: mlp(unravel(f), rows))(flat)  # (b, C, P) on the power rows
  h = spec.for_output_shape((B // 2, C)).hessian(mlp(PARAMS, rows), rows)
  g = jnp.einsum("icp,icd,idq->pq", jac, h, jac) / (B // 2)
  v = unravel(jnp.asarray(rng.normal(size=flat.shape), jnp.float32))
  key, n, iters = jax.random.PRNGKey(5), 3, 4
  est = jax.jit(lambda v: k_estimate.estimate(
      mlp, PARAMS, BATCH, loss=spec, key=key, output_norm=output_norm, trace_floor=0.03,
      num_probes=n, eigenvector=v, power_iters=iters, power_batch=rows,
      one_at_a_time=True))(v)
  # iters + 1 plain power steps on the dense G of the power rows: λ is the quotient of the
  # iters-th vector, the vector returned one step further.
  u = jax.flatten_util.ravel_pytree(v)[0]
  us = [u / jnp.linalg.norm(u)]
  for _ in range(iters + 1):
    w = g @ us[-1]
    us.append(w / jnp.linalg.norm(w))
  np.testing.assert_allclose(est.lambda_max, us[iters] @ g @ us[iters], rtol=1e-4)
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(est.eigenvector)[0], us[-1],
                             rtol=1e-3, atol=1e-5)
  # The trace: the mean of n one-probe estimates on the whole batch, probe i keyed by
  # fold_in(key's trace half, i); the floor from the same probes' NTK traces.
  lin = linearization.linearize(mlp, PARAMS, BATCH)
  trace_key = jax.random.split(key, 2)[0]
  keys = [jax.random.split(jax.random.fold_in(trace_key, i), 2) for i in range(n)]
  if output_norm == "total":
    pairs = [traces.hutchinson_traces(lin, (spec, mse), BATCH, key=k[0]) for k in keys]
    gn = np.mean([p[0].value for p in pairs])
    ntk = np.mean([p[1].value for p in pairs])
    np.testing.assert_allclose(est.trace, gn, rtol=1e-5)
    np.testing.assert_allclose(est.scale, max(gn, 0.03 * ntk), rtol=1e-5)
  else:
    m = np.mean([kstep.output_kernel(mlp, PARAMS, BATCH, loss="softmax_cross_entropy",
                                     key=k[0]).matrix for k in keys], axis=0)
    ntk = np.mean([traces.hutchinson_trace(lin, mse, BATCH, key=k[1]).value for k in keys])
    np.testing.assert_allclose(est.trace, np.trace(m), rtol=1e-5)
    np.testing.assert_allclose(est.scale, max(np.linalg.eigvalsh(m)[-1], 0.03 * ntk / C),
                               rtol=1e-4)
