"""Tests of kstep's curvature estimators against independent dense references.

References are built without kstep: dense Jacobians (``jax.jacfwd`` on the flattened params of the
whole batch), closed-form output Hessians evaluated in float64 NumPy, explicit parameter Hessians
(``jax.hessian`` on the flattened params) diagonalised with ``numpy.linalg.eigh``, and brute force.

XLA compilation dominates the run time on CPU, so kstep calls go through jitted functions that are
built once and reused, and the zero-output models reuse them too: the MLPs multiply their outputs by
a ``scale`` read from the batch (ones normally, zeros for the zero-output model).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kstep

try:
  from threadpoolctl import threadpool_limits
except ImportError:  # optional (it comes with scikit-learn)
  threadpool_limits = None

C = 3  # outputs per example
B = 6  # examples per batch in the trace tests


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_numpy_blas():
  """NumPy's references (eigh of 600×600 matrices) run on one BLAS thread: on a busy 2-core
  machine a multi-threaded OpenBLAS spins and is many times slower. JAX is not affected."""
  if threadpool_limits is None:
    yield
  else:
    with threadpool_limits(limits=1, user_api="blas"):
      yield


# --------------------------------------------------------------------------------------------
# Models in plain JAX (initialised with NumPy: fixed seeds, no compilation).
# --------------------------------------------------------------------------------------------


def f32(x):
  return jnp.asarray(x, jnp.float32)


def mlp_init(seed, sizes):
  rng = np.random.default_rng(seed)
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"w{i}"] = f32(rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in))
    params[f"b{i}"] = f32(0.1 * rng.normal(size=(fan_out,)))
  return params


def mlp_apply(params, batch):
  n = len(params) // 2
  h = batch["x"]
  for i in range(n):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < n - 1:
      h = jnp.tanh(h)
  return h


def scaled_mlp(params, batch):
  """The MLP times a per-example ``scale`` (B,) from the batch: all zeros gives a zero model."""
  return batch["scale"][:, None] * mlp_apply(params, batch)


def cnn_init(seed):
  rng = np.random.default_rng(seed)
  return {
      "conv1": f32(rng.normal(size=(3, 3, 2, 3)) / np.sqrt(18.0)),
      "bias1": f32(np.full((3,), 0.1)),
      "conv2": f32(rng.normal(size=(3, 3, 3, 4)) / np.sqrt(27.0)),
      "dense": f32(rng.normal(size=(16, C)) / 4.0),
      "bias2": f32(np.linspace(-0.2, 0.2, C)),
  }


def cnn_apply(params, batch):
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(batch["img"], params["conv1"], (1, 1), "SAME",
                                   dimension_numbers=dn)
  h = jnp.tanh(h + params["bias1"])  # (B, 5, 5, 3)
  h = jax.lax.conv_general_dilated(h, params["conv2"], (2, 2), "VALID", dimension_numbers=dn)
  h = jnp.tanh(h)  # (B, 2, 2, 4)
  return h.reshape(h.shape[0], -1) @ params["dense"] + params["bias2"]


def scalar_apply(params, batch):
  return mlp_apply(params, batch)[:, 0]  # outputs (B,)


def make_batch(seed, n=B, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      "x": f32(rng.normal(size=(n, 5))),
      "img": f32(rng.normal(size=(n, 5, 5, 2))),
      "y": f32(rng.normal(size=(n, C))),
      "label": jnp.asarray(rng.integers(0, C, size=(n,)), jnp.int32),
      "scale": f32(np.full((n,), scale)),
  }


MODELS = {
    "mlp": (scaled_mlp, lambda: mlp_init(0, [5, 10, C])),
    "cnn": (cnn_apply, lambda: cnn_init(0)),
}


@functools.lru_cache(maxsize=None)
def setup(model):
  """(apply_fn, params, batch, per-example Jacobians (B, C, P), outputs (B, C)), float64 refs."""
  apply_fn, init = MODELS[model]
  params = init()
  batch = make_batch(1)
  jac, outputs = dense_jacobian(apply_fn, params, batch)
  return apply_fn, params, batch, jac, outputs


def dense_jacobian(apply_fn, params, batch):
  """Jacobian of all outputs in the flattened params, (B, C, P) or (B, P), and the outputs."""
  flat, unravel = ravel_pytree(params)
  f = lambda x: apply_fn(unravel(x), batch)
  jac, outputs = jax.jit(lambda x: (jax.jacfwd(f)(x), f(x)))(flat)
  return np.asarray(jac, np.float64), np.asarray(outputs, np.float64)


def output_hessians(loss, outputs):
  """Closed-form output Hessians H_i (B, C, C), float64."""
  b, c = outputs.shape
  if loss == "mse":
    return np.broadcast_to(np.eye(c), (b, c, c))
  if loss == "softmax_cross_entropy":
    z = np.exp(outputs - outputs.max(-1, keepdims=True))
    p = z / z.sum(-1, keepdims=True)
    return np.stack([np.diag(q) - np.outer(q, q) for q in p])
  if loss == "sigmoid_binary_cross_entropy":
    s = 1.0 / (1.0 + np.exp(-outputs))
    return np.stack([np.diag(q * (1.0 - q)) for q in s])
  raise AssertionError(loss)


def gn_trace_ref(jac, hess):
  """(1/B) Σ_i tr(J_iᵀ H_i J_i) from dense Jacobians."""
  return float(np.einsum("bcp,bcd,bdp->", jac, hess, jac) / jac.shape[0])


def rel_err(a, b):
  return abs(float(a) - float(b)) / abs(float(b))


def trace_fn(apply_fn, loss, method="exact", num_probes=1, chunk_size=32):
  """A jitted ``gauss_newton_trace`` with everything static bound; ``(params, batch, key)``.

  Built once per configuration and reused across tests (compilation dominates the run time).
  """
  return _trace_fn(apply_fn, loss, method, num_probes, chunk_size)


@functools.lru_cache(maxsize=None)
def _trace_fn(apply_fn, loss, method, num_probes, chunk_size):
  fn = functools.partial(kstep.gauss_newton_trace, apply_fn, loss=loss, method=method,
                         num_probes=num_probes, chunk_size=chunk_size)
  return jax.jit(lambda params, batch, key=None: fn(params, batch, key=key))


LOSSES = ["mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"]


# --------------------------------------------------------------------------------------------
# Gauss–Newton trace: exact method.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model,loss", [("mlp", l) for l in LOSSES] +
                         [("cnn", "softmax_cross_entropy")])
def test_exact_trace_matches_dense_jacobian(model, loss):
  apply_fn, params, batch, jac, outputs = setup(model)
  ref = gn_trace_ref(jac, output_hessians(loss, outputs))
  assert ref > 0.05  # the reference is not degenerate
  est = trace_fn(apply_fn, loss)(params, batch)
  assert est.value.dtype == jnp.float32
  assert float(est.stderr) == 0.0
  assert rel_err(est.value, ref) < 1e-5


def test_exact_trace_chunking_does_not_change_the_answer():
  apply_fn, params, batch, jac, outputs = setup("cnn")
  ref = gn_trace_ref(jac, output_hessians("softmax_cross_entropy", outputs))
  whole = trace_fn(apply_fn, "softmax_cross_entropy", "exact", 1, 32)(params, batch)
  chunked = trace_fn(apply_fn, "softmax_cross_entropy", "exact", 1, 4)(params, batch)  # 4 ∤ 6
  np.testing.assert_allclose(chunked.value, whole.value, rtol=1e-6)
  assert rel_err(chunked.value, ref) < 1e-5


def test_mse_trace_is_ntk_trace():
  apply_fn, params, batch, jac, _ = setup("mlp")
  ref = float(np.sum(jac**2) / B)  # tr(J Jᵀ / B)
  ntk = jax.jit(functools.partial(kstep.ntk_trace, apply_fn, method="exact"))(params, batch)
  assert rel_err(ntk.value, ref) < 1e-5
  gn = trace_fn(apply_fn, "mse")(params, batch)
  np.testing.assert_allclose(ntk.value, gn.value, rtol=1e-6)


def test_hutchinson_probe_chunking_does_not_change_the_answer():
  apply_fn, params, batch, _, _ = setup("mlp")
  key = jax.random.PRNGKey(5)
  a = trace_fn(apply_fn, "mse", "hutchinson", 10)(params, batch, key)
  b = trace_fn(apply_fn, "mse", "hutchinson", 10, 3)(params, batch, key)  # 3 does not divide 10
  np.testing.assert_allclose(a.value, b.value, rtol=1e-6)
  np.testing.assert_allclose(a.stderr, b.stderr, rtol=1e-5)
  assert float(a.stderr) > 0


@pytest.mark.slow
def test_hutchinson_eager_matches_jit():
  apply_fn, params, batch, _, _ = setup("mlp")
  key = jax.random.PRNGKey(5)
  eager = kstep.gauss_newton_trace(apply_fn, params, batch, loss="softmax_cross_entropy",
                                   key=key, num_probes=10)
  jitted = trace_fn(apply_fn, "softmax_cross_entropy", "hutchinson", 10)(params, batch, key)
  np.testing.assert_allclose(eager.value, jitted.value, rtol=1e-5)
  np.testing.assert_allclose(eager.stderr, jitted.stderr, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Gauss–Newton trace: Hutchinson / sampled-label estimators.
# --------------------------------------------------------------------------------------------

NUM_REPEATS = 128  # independent estimates
PROBES_EACH = 16  # probes per estimate: 2048 probes in all


def repeated_estimates(apply_fn, params, batch, loss, seed):
  """NUM_REPEATS independent estimates (values, stderrs) of PROBES_EACH probes each."""
  keys = jax.random.split(jax.random.PRNGKey(seed), NUM_REPEATS)
  fn = lambda k: kstep.gauss_newton_trace(apply_fn, params, batch, loss=loss, key=k,
                                          num_probes=PROBES_EACH)
  est = jax.jit(jax.vmap(fn))(keys)
  return np.asarray(est.value, np.float64), np.asarray(est.stderr, np.float64)


def check_unbiased_and_calibrated(values, stderrs, ref):
  # Unbiased: the mean of all NUM_REPEATS * PROBES_EACH probes is within 3 standard errors.
  se = values.std(ddof=1) / np.sqrt(values.size)
  assert se < 0.05 * ref  # sharp enough to see a 15% bias
  assert abs(values.mean() - ref) < 3 * se, (values.mean(), ref, se)
  # The reported stderr of one estimate matches the spread across independent estimates.
  assert np.all(np.isfinite(stderrs)) and np.all(stderrs > 0)
  ratio = np.sqrt(np.mean(stderrs**2)) / values.std(ddof=1)
  assert 0.75 < ratio < 1.33, ratio


@pytest.mark.parametrize("loss", LOSSES)
def test_hutchinson_is_unbiased_with_calibrated_stderr(loss):
  apply_fn, params, batch, jac, outputs = setup("mlp")
  ref = gn_trace_ref(jac, output_hessians(loss, outputs))
  values, stderrs = repeated_estimates(apply_fn, params, batch, loss, seed=11)
  check_unbiased_and_calibrated(values, stderrs, ref)


@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_hutchinson_many_probes_in_one_call_cnn(loss):
  # One call averaging 1500 probes lands within 3 of its own reported standard errors.
  apply_fn, params, batch, jac, outputs = setup("cnn")
  ref = gn_trace_ref(jac, output_hessians(loss, outputs))
  est = trace_fn(apply_fn, loss, "hutchinson", 1500, 100)(params, batch, jax.random.PRNGKey(13))
  assert est.value.dtype == jnp.float32 and est.stderr.dtype == jnp.float32
  assert 0 < float(est.stderr) < 0.05 * ref
  assert abs(float(est.value) - ref) < 3 * float(est.stderr)


def test_single_probe_stderr_is_nan():
  apply_fn, params, batch, _, _ = setup("mlp")
  est = trace_fn(apply_fn, "softmax_cross_entropy", "hutchinson")(params, batch,
                                                                  jax.random.PRNGKey(0))
  assert np.isfinite(est.value) and np.isnan(est.stderr)


# --------------------------------------------------------------------------------------------
# Callable losses: the output Hessian is derived from the loss actually used.
# --------------------------------------------------------------------------------------------


def mse_mean_over_classes(outputs, batch):
  return 0.5 * jnp.mean((outputs - batch["y"]) ** 2, axis=-1)


def mse_without_half(outputs, batch):
  return jnp.sum((outputs - batch["y"]) ** 2, axis=-1)


def softmax_ce_by_hand(outputs, batch):
  correct = jnp.take_along_axis(outputs, batch["label"][:, None], axis=-1)[:, 0]
  return jax.scipy.special.logsumexp(outputs, axis=-1) - correct


CALLABLES = [
    (mse_mean_over_classes, "mse", 1.0 / C),
    (mse_without_half, "mse", 2.0),
    (softmax_ce_by_hand, "softmax_cross_entropy", 1.0),
]


@pytest.mark.parametrize("fn,named,factor", CALLABLES, ids=lambda x: getattr(x, "__name__", ""))
def test_callable_loss_exact(fn, named, factor):
  apply_fn, params, batch, jac, outputs = setup("mlp")
  ref = factor * gn_trace_ref(jac, output_hessians(named, outputs))
  est = trace_fn(apply_fn, fn)(params, batch)
  assert rel_err(est.value, ref) < 1e-5
  named_est = trace_fn(apply_fn, named)(params, batch)
  np.testing.assert_allclose(est.value, factor * named_est.value, rtol=1e-5)


def test_callable_loss_hutchinson_unbiased():
  # Parameter-space probes; the params are one flat vector here (one random draw per probe).
  apply_fn, params, batch, jac, outputs = setup("mlp")
  flat, unravel = ravel_pytree(params)
  flat_apply = lambda f, b: apply_fn(unravel(f), b)
  ref = gn_trace_ref(jac, output_hessians("softmax_cross_entropy", outputs))
  values, stderrs = repeated_estimates(flat_apply, flat, batch, softmax_ce_by_hand, seed=21)
  check_unbiased_and_calibrated(values, stderrs, ref)


def test_callable_loss_hutchinson_pytree_params():
  # The same probes over a dict of params: MSE without the ½ gives twice the NTK trace.
  apply_fn, params, batch, jac, _ = setup("mlp")
  ref = 2.0 * float(np.sum(jac**2) / B)
  est = trace_fn(apply_fn, mse_without_half, "hutchinson", 1000, 250)(
      params, batch, jax.random.PRNGKey(22))
  assert 0 < float(est.stderr) < 0.05 * ref
  assert abs(float(est.value) - ref) < 3 * float(est.stderr)


# --------------------------------------------------------------------------------------------
# Scalar-output models and the empirical NTK.
# --------------------------------------------------------------------------------------------

N_SCALAR = 10


@functools.lru_cache(maxsize=None)
def scalar_setup():
  params = mlp_init(7, [5, 8, 1])
  batch = make_batch(8, n=N_SCALAR)
  jac, outputs = dense_jacobian(scalar_apply, params, batch)  # (N, P), (N,)
  return params, batch, jac, outputs


def weighted_sq(out, batch):
  assert out.shape == (N_SCALAR,)  # the callable sees outputs in the model's own shape
  return 1.5 * (out - batch["y"][:, 0]) ** 2


@pytest.mark.slow
def test_scalar_output_model():
  params, batch, jac, outputs = scalar_setup()
  assert outputs.shape == (N_SCALAR,)
  ref = float(np.sum(jac**2) / N_SCALAR)
  s = 1.0 / (1.0 + np.exp(-outputs))
  ref_bce = float(np.sum(s * (1 - s) * np.sum(jac**2, axis=1)) / N_SCALAR)
  exact = lambda loss: kstep.gauss_newton_trace(scalar_apply, params, batch, loss=loss,
                                                method="exact", chunk_size=3).value
  mse, bce, callable_ = jax.jit(
      lambda: [exact(l) for l in ("mse", "sigmoid_binary_cross_entropy", weighted_sq)])()
  assert rel_err(mse, ref) < 1e-5
  assert rel_err(bce, ref_bce) < 1e-5
  assert rel_err(callable_, 3.0 * ref) < 1e-5  # 1.5 (out − y)²: output Hessian 3

  hut = trace_fn(scalar_apply, "mse", "hutchinson", 2000, 500)(params, batch,
                                                               jax.random.PRNGKey(2))
  assert 0 < float(hut.stderr) < 0.05 * ref
  assert abs(float(hut.value) - ref) < 3 * float(hut.stderr)


def test_empirical_ntk_matches_dense_jacobian():
  params, batch, jac, _ = scalar_setup()
  ref = jac @ jac.T / N_SCALAR
  ntk = jax.jit(functools.partial(kstep.empirical_ntk, scalar_apply, chunk_size=4))(params, batch)
  assert ntk.shape == (N_SCALAR, N_SCALAR) and ntk.dtype == jnp.float32
  np.testing.assert_allclose(ntk, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  with pytest.raises(ValueError, match="one output per example"):
    kstep.empirical_ntk(mlp_apply, mlp_init(0, [5, 4, C]), batch)


# --------------------------------------------------------------------------------------------
# bf16, zero models, bad input.
# --------------------------------------------------------------------------------------------


def to_bf16(tree):
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, tree)


@pytest.mark.parametrize("loss,method", [
    ("mse", "hutchinson"), (softmax_ce_by_hand, "exact"),
    pytest.param("softmax_cross_entropy", "exact", marks=pytest.mark.slow),
])
def test_bf16_params_give_float32_estimates(loss, method):
  apply_fn, params, batch, _, _ = setup("mlp")
  p16, b16 = to_bf16(params), to_bf16(batch)  # the whole model then runs in bf16
  assert jax.eval_shape(apply_fn, p16, b16).dtype == jnp.bfloat16
  key = jax.random.PRNGKey(6)  # the same Rademacher probes for both
  num_probes = 1 if method == "exact" else 10
  fn = trace_fn(apply_fn, loss, method, num_probes)
  ref, est = fn(params, batch, key), fn(p16, b16, key)
  assert est.value.dtype == jnp.float32 and est.stderr.dtype == jnp.float32
  tol = 0.05 if method == "exact" else 0.05 + 3 * float(ref.stderr / ref.value)
  assert rel_err(est.value, ref.value) < tol, (est.value, ref.value)


@pytest.mark.parametrize("loss,method,num_probes", [
    ("mse", "exact", 1), ("softmax_cross_entropy", "exact", 1),
    ("sigmoid_binary_cross_entropy", "exact", 1), (softmax_ce_by_hand, "exact", 1),
    ("mse", "hutchinson", 10), ("softmax_cross_entropy", "hutchinson", 1),
    (mse_without_half, "hutchinson", 1000),
])
def test_zero_output_model_gives_zero_trace(loss, method, num_probes):
  apply_fn, params, _, _, _ = setup("mlp")
  zero_batch = make_batch(1, scale=0.0)  # the same compiled function as the live model
  chunk = 250 if num_probes == 1000 else 32
  est = trace_fn(apply_fn, loss, method, num_probes, chunk)(params, zero_batch,
                                                           jax.random.PRNGKey(0))
  assert float(est.value) == 0.0
  if num_probes > 1:
    assert float(est.stderr) == 0.0


def constant_apply(params, batch):
  del params  # outputs that do not depend on the params: a zero Jacobian
  return jnp.tanh(batch["x"][:, :C])


def test_params_independent_model_gives_zero_trace():
  _, params, batch, _, _ = setup("mlp")
  est = trace_fn(constant_apply, "softmax_cross_entropy", "hutchinson", 4)(
      params, batch, jax.random.PRNGKey(0))
  assert float(est.value) == 0.0 and float(est.stderr) == 0.0


def test_trace_bad_input_raises_value_error():
  apply_fn, params, batch, _, _ = setup("mlp")
  key = jax.random.PRNGKey(0)
  call = functools.partial(kstep.gauss_newton_trace, apply_fn, params, batch)
  with pytest.raises(ValueError, match="`loss`"):
    call(loss="hinge", key=key)
  with pytest.raises(ValueError, match="`loss`"):
    call(loss=3, key=key)
  with pytest.raises(ValueError, match="`method`"):
    call(method="lanczos", key=key)
  with pytest.raises(ValueError, match="`num_probes`"):
    call(num_probes=0, key=key)
  with pytest.raises(ValueError, match="`chunk_size`"):
    call(chunk_size=0, key=key)
  with pytest.raises(ValueError, match="`key`"):
    call(method="hutchinson")
  with pytest.raises(ValueError, match="`key`"):
    kstep.ntk_trace(apply_fn, params, batch)


# --------------------------------------------------------------------------------------------
# Hessian-vector products and λ_max.
# --------------------------------------------------------------------------------------------

LM_N = 16  # examples in the λ_max batch


def lm_loss(params, batch):
  """MSE of a tanh MLP; ``neg`` = 1 subtracts ``‖f‖²`` (nonconvex: the dominant eigenvalue is
  negative); ``scale`` = 0 zeroes the outputs (zero-output model, constant loss)."""
  f = batch["scale"] * mlp_apply(params, batch)
  per_example = 0.5 * jnp.sum((f - batch["y"]) ** 2, -1) - batch["neg"] * jnp.sum(f**2, -1)
  return jnp.mean(per_example)


@functools.lru_cache(maxsize=None)
def lm_setup():
  params = mlp_init(3, [5, 20, 20, C])
  rng = np.random.default_rng(5)
  base = {"x": f32(rng.normal(size=(LM_N, 5))), "y": f32(rng.normal(size=(LM_N, C)))}
  flat, unravel = ravel_pytree(params)
  assert flat.size >= 500
  hess = jax.jit(jax.hessian(lambda f, b: lm_loss(unravel(f), b)))
  return params, base, hess


def lm_batch(base, neg, scale=1.0):
  return dict(base, neg=f32(neg), scale=f32(scale))


def explicit_hessian(params, batch):
  h = np.asarray(lm_setup()[2](ravel_pytree(params)[0], batch), np.float64)
  return 0.5 * (h + h.T)


@functools.lru_cache(maxsize=None)
def lm_spectrum(neg):
  params, base, _ = lm_setup()
  return np.linalg.eigvalsh(explicit_hessian(params, lm_batch(base, neg)))


def random_like(params, seed):
  flat, unravel = ravel_pytree(params)
  return unravel(f32(np.random.default_rng(seed).normal(size=flat.shape)))


# One compiled solver per method, reused everywhere: the loss is parametrised through the batch.
NUM_ITERS = {"lanczos": 40, "power": 2000}
SOLVERS = {
    m: jax.jit(functools.partial(kstep.lambda_max, lm_loss, method=m, num_iters=n))
    for m, n in NUM_ITERS.items()
}


def test_hvp_matches_explicit_hessian():
  params, base, _ = lm_setup()
  batch = lm_batch(base, neg=1.0)
  v = random_like(params, 0)
  ref = explicit_hessian(params, batch) @ np.asarray(ravel_pytree(v)[0], np.float64)
  out = jax.jit(functools.partial(kstep.hvp, lm_loss))(params, batch, v)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  np.testing.assert_allclose(ravel_pytree(out)[0], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("method,neg", [
    pytest.param("lanczos", 0.0, marks=pytest.mark.slow, id="mse-lanczos"),
    pytest.param("power", 0.0, id="mse-power"),
    pytest.param("lanczos", 1.0, id="negative_dominant-lanczos"),
    pytest.param("power", 1.0, id="negative_dominant-power")])
def test_lambda_max_matches_eigh(method, neg):
  params, base, _ = lm_setup()
  batch = lm_batch(base, neg)
  h = explicit_hessian(params, batch)
  evals = lm_spectrum(neg)
  top = evals[-1]
  assert top > 0
  if neg:  # the case plain power iteration gets wrong: the largest |λ| is negative
    assert -evals[0] > 2 * top
  else:
    assert -evals[0] < top
  res = SOLVERS[method](params, batch, init=random_like(params, 1))
  assert res.value.dtype == jnp.float32
  assert rel_err(res.value, top) < 1e-3, (res.value, top)
  # The returned pair: unit vector, Rayleigh quotient, and residual ‖Hv − λv‖ recomputed here.
  v = np.asarray(ravel_pytree(res.eigenvector)[0], np.float64)
  np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-5)
  np.testing.assert_allclose(v @ h @ v, res.value, rtol=1e-5)
  residual = np.linalg.norm(h @ v - float(res.value) * v)
  assert residual < 1e-3 * top
  np.testing.assert_allclose(res.residual, residual, rtol=0.05, atol=2e-5 * top)
  assert 0 < int(res.num_iters) < NUM_ITERS[method]  # stopped on the residual, not the budget


@functools.lru_cache(maxsize=None)
def moved_params():
  """The λ_max MLP after a small update (relative size 1e-3), as between two training steps."""
  params, _, _ = lm_setup()
  flat, unravel = ravel_pytree(params)
  step = np.random.default_rng(3).normal(size=flat.shape)
  return unravel(flat + f32(1e-3 * np.linalg.norm(flat) * step / np.linalg.norm(step)))


@functools.lru_cache(maxsize=None)
def moved_top(neg):
  _, base, _ = lm_setup()
  return np.linalg.eigvalsh(explicit_hessian(moved_params(), lm_batch(base, neg)))[-1]


@pytest.mark.parametrize("method,neg", [
    ("lanczos", 0.0), ("lanczos", 1.0), pytest.param("power", 0.0, marks=pytest.mark.slow)])
def test_lambda_max_warm_start_needs_fewer_iterations(method, neg):
  params, base, _ = lm_setup()
  batch = lm_batch(base, neg)
  solve = SOLVERS[method]
  first = solve(params, batch, init=random_like(params, 2))
  moved = moved_params()
  cold = solve(moved, batch, init=random_like(params, 4))
  warm = solve(moved, batch, init=first.eigenvector)
  top = moved_top(neg)
  assert rel_err(cold.value, top) < 1e-3 and rel_err(warm.value, top) < 1e-3
  assert int(warm.num_iters) <= int(cold.num_iters) // 2, (warm.num_iters, cold.num_iters)


@pytest.mark.slow
def test_lambda_max_zero_hessian_is_zero():
  params, base, _ = lm_setup()
  batch = lm_batch(base, neg=1.0, scale=0.0)  # zero-output model: the loss is constant
  for method, solve in SOLVERS.items():
    res = solve(params, batch, init=random_like(params, 5))
    assert float(res.value) == 0.0 and float(res.residual) == 0.0, method
    # A warm start from an all-zero vector must not produce NaN either.
    res = solve(params, batch, init=jax.tree.map(jnp.zeros_like, params))
    assert float(res.value) == 0.0, method
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(res.eigenvector))


@pytest.mark.slow
def test_lambda_max_bf16_params():
  params, base, _ = lm_setup()
  batch = lm_batch(base, neg=1.0)
  top = lm_spectrum(1.0)[-1]
  res = SOLVERS["lanczos"](to_bf16(params), batch, init=random_like(params, 1))
  assert res.value.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(res.eigenvector))
  assert rel_err(res.value, top) < 0.05


def test_lambda_max_bad_input():
  params, base, _ = lm_setup()
  batch = lm_batch(base, neg=0.0)
  with pytest.raises(ValueError, match="`method`"):
    kstep.lambda_max(lm_loss, params, batch, method="arnoldi", init=params)
  with pytest.raises(ValueError, match="`num_iters`"):
    kstep.lambda_max(lm_loss, params, batch, num_iters=0)
  with pytest.raises(ValueError, match="`loss`"):
    kstep.gauss_newton_lambda_max(mlp_apply, params, batch, loss="l1")


# Gauss–Newton matrix: the λ_max MLP with a per-example output scale.
GN_SOLVERS = {
    (loss, m): jax.jit(functools.partial(kstep.gauss_newton_lambda_max, scaled_mlp, loss=loss,
                                         method=m, num_iters=NUM_ITERS[m]))
    for loss, m in [("mse", "lanczos"), ("softmax_cross_entropy", "power")]
}
GN_CASES = [("mse", "lanczos"),
            pytest.param("softmax_cross_entropy", "power", marks=pytest.mark.slow)]


def gn_setup(scale=1.0):
  params, base, _ = lm_setup()
  batch = dict(base, label=jnp.asarray(np.arange(LM_N) % C, jnp.int32),
               scale=f32(np.full((LM_N,), scale)))
  return params, batch


@functools.lru_cache(maxsize=None)
def gn_jacobian():
  params, batch = gn_setup()
  return dense_jacobian(scaled_mlp, params, batch)


def explicit_gn(loss):
  """J^T H J / B from a dense Jacobian; ``loss`` is a name, or ``mse_without_half``."""
  jac, outputs = gn_jacobian()
  named, factor = ("mse", 2.0) if loss is mse_without_half else (loss, 1.0)
  return factor * np.einsum("bcp,bcd,bdq->pq", jac, output_hessians(named, outputs), jac,
                             optimize=True) / LM_N


@pytest.mark.parametrize("loss,method", GN_CASES)
def test_gauss_newton_lambda_max_matches_eigh(loss, method):
  params, batch = gn_setup()
  gn = explicit_gn(loss)
  top = np.linalg.eigvalsh(gn)[-1]
  res = GN_SOLVERS[loss, method](params, batch, key=jax.random.PRNGKey(0))
  assert rel_err(res.value, top) < 1e-3, (res.value, top)
  v = np.asarray(ravel_pytree(res.eigenvector)[0], np.float64)
  np.testing.assert_allclose(res.residual, np.linalg.norm(gn @ v - float(res.value) * v),
                             rtol=0.05, atol=2e-5 * top)
  # The zero-output model has a zero Gauss–Newton matrix.
  zero = GN_SOLVERS[loss, method](params, gn_setup(0.0)[1], key=jax.random.PRNGKey(0))
  assert float(zero.value) == 0.0 and float(zero.residual) == 0.0


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", mse_without_half])
def test_gauss_newton_vp_matches_explicit(loss):
  params, batch = gn_setup()
  v = random_like(params, 6)
  ref = explicit_gn(loss) @ np.asarray(ravel_pytree(v)[0], np.float64)
  out = jax.jit(functools.partial(kstep.gauss_newton_vp, scaled_mlp, loss=loss))(params, batch, v)
  np.testing.assert_allclose(ravel_pytree(out)[0], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", mse_without_half])
def test_gauss_newton_quadratic_from_one_jvp_matches_explicit(loss):
  from kstep._src import losses
  from kstep._src.estimators import linearization, products
  params, batch = gn_setup()
  v = random_like(params, 7)
  flat = np.asarray(ravel_pytree(v)[0], np.float64)
  ref = flat @ explicit_gn(loss) @ flat
  spec = losses.resolve_loss(loss)
  lin = linearization.linearize(scaled_mlp, params, batch)
  out = jax.jit(lambda v: products.gauss_newton_quadratic(lin, spec, batch, v))(v)
  np.testing.assert_allclose(out, ref, rtol=1e-4)
  assert out.dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# Batch Sharpness.
# --------------------------------------------------------------------------------------------

M = 4  # batches


def stacked_batches(neg, scale=1.0, m=M):
  rng = np.random.default_rng(20)
  return {
      "x": f32(rng.normal(size=(m, LM_N, 5))),
      "y": f32(rng.normal(size=(m, LM_N, C))),
      "neg": f32(np.full((m,), neg)),
      "scale": f32(np.full((m,), scale)),
  }


@functools.lru_cache(maxsize=None)
def flat_grad():
  flat, unravel = ravel_pytree(lm_setup()[0])
  return jax.jit(jax.grad(lambda f, b: lm_loss(unravel(f), b)))


def brute_force_sharpness(params, batches):
  _, _, hess = lm_setup()
  flat = ravel_pytree(params)[0]
  grad = flat_grad()
  num, den = [], []
  for m in range(M):
    bm = jax.tree.map(lambda x: x[m], batches)
    g = np.asarray(grad(flat, bm), np.float64)
    h = np.asarray(hess(flat, bm), np.float64)
    num.append(g @ h @ g)
    den.append(g @ g)
  return np.array(num), np.array(den)


SHARPNESS = {
    r: jax.jit(functools.partial(kstep.batch_sharpness, lm_loss, reduction=r))
    for r in ("ratio_of_means", "mean_of_ratios")
}


@pytest.mark.parametrize("neg", [pytest.param(0.0, marks=pytest.mark.slow), 1.0])
def test_batch_sharpness_matches_brute_force(neg):
  params, _, _ = lm_setup()
  batches = stacked_batches(neg)
  num, den = brute_force_sharpness(params, batches)
  ratio_of_means = num.mean() / den.mean()
  ratios = num / den
  # The two reductions are different numbers here (the test can tell them apart).
  assert abs(ratio_of_means / ratios.mean() - 1) > 1e-3
  expected = {
      "ratio_of_means": (ratio_of_means,
                         np.std(num - ratio_of_means * den, ddof=1) / np.sqrt(M) / den.mean()),
      "mean_of_ratios": (ratios.mean(), np.std(ratios, ddof=1) / np.sqrt(M)),
  }
  for reduction, fn in SHARPNESS.items():
    res = fn(params, batches)
    assert res.value.dtype == jnp.float32
    np.testing.assert_allclose(res.curvature, num, rtol=1e-4)
    np.testing.assert_allclose(res.grad_sq_norm, den, rtol=1e-4)
    value, stderr = expected[reduction]
    np.testing.assert_allclose(res.value, value, rtol=1e-4)
    assert np.isfinite(float(res.stderr)) and float(res.stderr) > 0
    np.testing.assert_allclose(res.stderr, stderr, rtol=1e-3)


def test_batch_sharpness_zero_gradient_gives_zero():
  params, _, _ = lm_setup()
  zero = stacked_batches(0.0, scale=0.0)  # zero-output model: every gradient vanishes
  for reduction, fn in SHARPNESS.items():
    res = fn(params, zero)
    assert float(res.value) == 0.0 and float(res.stderr) == 0.0, reduction
    assert not np.any(np.isnan(res.curvature)) and not np.any(np.isnan(res.grad_sq_norm))


def test_batch_sharpness_eager_bf16_single_batch_and_bad_reduction():
  params, _, _ = lm_setup()
  batches = stacked_batches(0.0, m=1)
  ref = SHARPNESS["ratio_of_means"](params, stacked_batches(0.0))
  res = kstep.batch_sharpness(lm_loss, to_bf16(params), batches)
  assert res.value.dtype == jnp.float32 and res.stderr.dtype == jnp.float32
  # One batch: the first of the M above, in bf16; no spread, so the stderr is NaN.
  assert rel_err(res.value, ref.curvature[0] / ref.grad_sq_norm[0]) < 0.05
  assert np.isnan(float(res.stderr))
  with pytest.raises(ValueError, match="`reduction`"):
    kstep.batch_sharpness(lm_loss, params, batches, reduction="median")


# --------------------------------------------------------------------------------------------
# Complex params: rejected by name (they would give silently wrong curvature, e.g. half of ‖J‖²).
# --------------------------------------------------------------------------------------------

COMPLEX_CALLS = {
    "hvp": lambda p, b, f, l: kstep.hvp(l, p, b, p),
    "gauss_newton_vp": lambda p, b, f, l: kstep.gauss_newton_vp(f, p, b, p),
    "batch_curvature": lambda p, b, f, l: kstep._src.estimators.batch_curvature(l, p, b),
    "lambda_max": lambda p, b, f, l: kstep.lambda_max(l, p, b, num_iters=2),
    "gauss_newton_lambda_max": lambda p, b, f, l: kstep.gauss_newton_lambda_max(
        f, p, b, num_iters=2),
    "batch_sharpness": lambda p, b, f, l: kstep.batch_sharpness(
        l, p, jax.tree.map(lambda x: x[None], b)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPLEX_CALLS))
def test_complex_params_are_rejected_naming_params(name):
  apply_fn = lambda p, b: jnp.real(b["x"] @ p["w"])
  loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.sum((apply_fn(p, b) - b["y"]) ** 2, -1))
  batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}
  z = {"w": jnp.ones((3, 2), jnp.complex64)}
  with pytest.raises(ValueError, match=rf"kstep.{name}: `params` must be real; params\['w'\]"):
    COMPLEX_CALLS[name](z, batch, apply_fn, loss_fn)
  COMPLEX_CALLS[name]({"w": jnp.ones((3, 2))}, batch, apply_fn, loss_fn)  # real params run
