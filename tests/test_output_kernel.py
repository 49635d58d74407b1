"""Tests of kstep.output_kernel against dense per-example Jacobians (NumPy, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kstep

C, B = 4, 8


def mlp_init(seed, sizes):
  rng = np.random.default_rng(seed)
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"w{i}"] = jnp.asarray(rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in), jnp.float32)
    params[f"b{i}"] = jnp.asarray(0.1 * rng.normal(size=(fan_out,)), jnp.float32)
  return params


def mlp_apply(params, batch):
  h = batch["x"]
  n = len(params) // 2
  for i in range(n):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < n - 1:
      h = jnp.tanh(h)
  return h * batch["scale"][:, None]


PARAMS = mlp_init(0, [5, 16, C])
rng = np.random.default_rng(1)
BATCH = {"x": jnp.asarray(rng.normal(size=(B, 5)), jnp.float32), "scale": jnp.ones((B,))}
# Unequal output scales: the kernel is far from isotropic.
UNEQUAL = lambda p, b: mlp_apply(p, b) * jnp.asarray([3.0, 1.0, 0.5, 0.2])


def dense_jacobians(apply_fn, params, batch):
  """(B, C, P) per-example Jacobians from one dense jacfwd over the flattened params (float64)."""
  flat, unravel = ravel_pytree(params)
  jac = jax.jacfwd(lambda f: apply_fn(unravel(f), batch))(flat)
  return np.asarray(jac, np.float64)


def dense_m(apply_fn, params, batch, hessians=None):
  jac = dense_jacobians(apply_fn, params, batch)
  ker = np.einsum("icp,idp->icd", jac, jac)
  if hessians is not None:
    roots = []
    for h in hessians:
      lam, v = np.linalg.eigh(h)
      roots.append(v @ np.diag(np.sqrt(np.maximum(lam, 0))) @ v.T)
    roots = np.stack(roots)
    ker = roots @ ker @ roots
  return ker.mean(0)


def softmax_hessians(outputs):
  z = np.asarray(outputs, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.stack([np.diag(q) - np.outer(q, q) for q in p])


@pytest.mark.slow
@pytest.mark.parametrize("apply_fn", [mlp_apply, UNEQUAL], ids=["mlp", "unequal"])
def test_exact_matches_dense_jacobians_mse(apply_fn):
  ref = dense_m(apply_fn, PARAMS, BATCH)
  got = kstep.output_kernel(apply_fn, PARAMS, BATCH, method="exact")
  np.testing.assert_allclose(got.matrix, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  assert np.all(np.asarray(got.stderr) == 0)
  # tr M is the NTK trace.
  t = kstep.gauss_newton_trace(apply_fn, PARAMS, BATCH, method="exact").value
  np.testing.assert_allclose(np.trace(got.matrix), t, rtol=1e-5)


def test_exact_matches_dense_jacobians_cross_entropy():
  h = softmax_hessians(mlp_apply(PARAMS, BATCH))
  ref = dense_m(mlp_apply, PARAMS, BATCH, h)
  got = kstep.output_kernel(mlp_apply, PARAMS, BATCH, loss="softmax_cross_entropy",
                            method="exact")
  np.testing.assert_allclose(got.matrix, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  gn = kstep.gauss_newton_trace(mlp_apply, PARAMS, BATCH, loss="softmax_cross_entropy",
                                method="exact").value
  np.testing.assert_allclose(np.trace(got.matrix), gn, rtol=1e-5)


def test_callable_loss_hessian_is_derived():
  # ℓ = mean_c (f − y)²: H = 2I/C, so M is (2/C) × the MSE kernel.
  loss = lambda out, batch: jnp.mean(jnp.square(out), axis=-1)
  ref = dense_m(mlp_apply, PARAMS, BATCH) * 2.0 / C
  got = kstep.output_kernel(mlp_apply, PARAMS, BATCH, loss=loss, method="exact")
  np.testing.assert_allclose(got.matrix, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_hutchinson_is_unbiased_per_entry(loss):
  n = 2000
  apply_fn = UNEQUAL if loss == "mse" else mlp_apply
  exact = kstep.output_kernel(apply_fn, PARAMS, BATCH, loss=loss, method="exact").matrix
  est = jax.jit(lambda k: kstep.output_kernel(apply_fn, PARAMS, BATCH, loss=loss, key=k,
                                              num_probes=n))(jax.random.PRNGKey(3))
  z = np.abs(np.asarray(est.matrix) - np.asarray(exact)) / np.asarray(est.stderr)
  # Diagonal and off-diagonal entries: every entry within 4 standard errors (16 entries; 3 is
  # exceeded by chance in ~4% of entries), and the bulk within 3.
  assert np.all(z < 4.0), z
  assert np.mean(z < 3.0) >= 0.9


def test_max_output_at_least_per_output_and_equal_when_isotropic():
  m = np.asarray(kstep.output_kernel(UNEQUAL, PARAMS, BATCH, method="exact").matrix)
  lam = np.linalg.eigvalsh(m)
  assert lam[-1] >= np.trace(m) / C
  assert lam[-1] > 1.5 * np.trace(m) / C  # unequal outputs: clearly above
  # Isotropic: a linear model with the same weights for every output direction up to rotation:
  # J_i J_iᵀ = ‖x_i‖² I, so M = mean ‖x‖² · I and λ_max(M) = tr(M)/C.
  lin = lambda p, b: b["x"] @ p["w"]
  iso = np.asarray(kstep.output_kernel(lin, {"w": jnp.ones((5, C))}, BATCH, method="exact").matrix)
  lam = np.linalg.eigvalsh(iso)
  np.testing.assert_allclose(lam[-1], np.trace(iso) / C, rtol=1e-5)


@pytest.mark.slow
def test_scalar_outputs_give_the_trace():
  scalar = lambda p, b: mlp_apply(p, b)[:, 0]
  m = kstep.output_kernel(scalar, PARAMS, BATCH, method="exact").matrix
  assert m.shape == (1, 1)
  t = kstep.ntk_trace(scalar, PARAMS, BATCH, method="exact").value
  np.testing.assert_allclose(m[0, 0], t, rtol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="method"):
    kstep.output_kernel(mlp_apply, PARAMS, BATCH, method="dense")
  with pytest.raises(ValueError, match="key"):
    kstep.output_kernel(mlp_apply, PARAMS, BATCH)
  with pytest.raises(ValueError, match="num_probes"):
    kstep.output_kernel(mlp_apply, PARAMS, BATCH, key=jax.random.PRNGKey(0), num_probes=0)


def test_a_callable_named_mse_keeps_its_own_hessian():
  def mse(out, batch):  # averages over the outputs: H = 2I/C, not I
    return jnp.mean(jnp.square(out), axis=-1)

  ref = dense_m(mlp_apply, PARAMS, BATCH) * 2.0 / C
  np.testing.assert_allclose(
      kstep.output_kernel(mlp_apply, PARAMS, BATCH, loss=mse, method="exact").matrix, ref,
      rtol=1e-5, atol=1e-6)
  est = kstep.output_kernel(mlp_apply, PARAMS, BATCH, loss=mse, key=jax.random.PRNGKey(0),
                            num_probes=2000)
  assert np.all(np.abs(np.asarray(est.matrix) - ref) < 4.5 * np.asarray(est.stderr) + 1e-6)
