"""The controller's physics: K per output, the curvature edge, the annealed band, B from the batch.

References: float64 NumPy simulations of SGD on a linear C-output model with example-wise
batches (docs/design.md, "Several outputs per example"), the closed-form curvature edges of heavy
ball and Nesterov momentum checked by simulating optax's own ``sgd`` on a quadratic, and closed-form
kernels of linear models.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from control_helpers import diverges_on_quadratic
from sklearn.datasets import load_digits

import kstep
from kstep._src import k_estimate

# ------------------------------------------------------------------------------------------------
# Linear C-output model: f_c(x_i) = s_c ⟨θ_c, x_i⟩, so the NTK is Θ_x ⊗ diag(s²) and M = mean‖x‖²
# diag(s²). Isotropic outputs (s = 1) and unequal ones.


def simulate_diverges(x, s, eta, batch, steps, runs, rng):
  """SGD (float64) on ½ Σ_c f_c² from random θ: does the full loss grow over ``steps``?"""
  n, p = x.shape
  theta = rng.normal(size=(runs, len(s), p))
  loss = lambda th: np.sum(np.einsum("np,rcp->rnc", x, th) ** 2 * s**2)
  start = loss(theta)
  with np.errstate(over="ignore", invalid="ignore"):
    for _ in range(steps):
      idx = np.stack([rng.choice(n, batch, replace=False) for _ in range(runs)])
      xb = x[idx]
      z = np.einsum("rbp,rcp->rbc", xb, theta) * s
      theta = theta - eta / batch * np.einsum("rbp,rbc->rcp", xb, z * s)
      if not np.all(np.isfinite(theta)):
        return True
    return not loss(theta) <= start


def divergence_step(x, s, batch, seed):
  rng = np.random.default_rng(seed)
  lo, hi = 1e-3, 1.0
  for _ in range(12):
    mid = np.sqrt(lo * hi)
    if simulate_diverges(x, s, mid, batch, 2000, 4, rng):
      hi = mid
    else:
      lo = mid
  return np.sqrt(lo * hi)


CASES = {
    "C2_isotropic": np.ones(2),
    "C2_unequal": np.array([2.0, 0.5]),
    "C10_isotropic": np.ones(10),
    "C10_unequal": np.linspace(0.3, 2.0, 10),
}


@pytest.mark.parametrize("case", [
    c if c == "C2_unequal" else pytest.param(c, marks=pytest.mark.slow) for c in CASES
])
def test_max_output_k_is_one_at_the_simulated_edge(case):
  s = CASES[case]
  n, p, batch = 100, 120, 5
  x = np.random.default_rng(0).normal(size=(n, p))
  eta = divergence_step(x, s, batch, seed=1)
  # kstep's kernel of the same model (JAX, float32), exact per-example Jacobians.
  apply_fn = lambda th, b: jnp.einsum("np,cp->nc", b["x"], th["t"]) * jnp.asarray(s, jnp.float32)
  params = {"t": jnp.zeros((len(s), p), jnp.float32)}
  m = np.asarray(kstep.output_kernel(apply_fn, params, {"x": jnp.asarray(x, jnp.float32)},
                                     method="exact").matrix, np.float64)
  k_max = eta / (2 * batch) * np.linalg.eigvalsh(m)[-1]
  k_per = eta / (2 * batch) * np.trace(m) / len(s)
  assert 0.75 <= k_max <= 1.1, (eta, k_max)
  if np.all(s == 1.0):
    assert 0.75 <= k_per <= 1.1, (eta, k_per)
    assert k_per * len(s) > 0.75 * len(s)  # the total K reads ≈ C at the edge
  else:
    assert k_per < 0.6  # per output undercounts when one output dominates


# ------------------------------------------------------------------------------------------------
# The curvature edge of momentum methods (optax's own sgd on f(θ) = λθ²/2).


def quadratic_diverges(eta, lam, momentum, nesterov):
  return diverges_on_quadratic(optax.sgd(eta, momentum=momentum, nesterov=nesterov), lam)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("nesterov", [False, True])
def test_curvature_edge_matches_optax_sgd(momentum, nesterov):
  edge = float(kstep.curvature_edge(momentum, nesterov))
  expected = 2 * (1 + momentum) / (1 + 2 * momentum) if nesterov else 2 * (1 + momentum)
  assert edge == pytest.approx(expected, rel=1e-6)
  lam = 3.0
  assert not quadratic_diverges(0.98 * edge / lam, lam, momentum, nesterov)
  assert quadratic_diverges(1.02 * edge / lam, lam, momentum, nesterov)


# ------------------------------------------------------------------------------------------------
# The guard at large batch: an MLP on digits (64-256-256-10, ReLU), 10-class MSE, B = 1024, base
# LR 3, per-output band (0.3, 0.6). K at base LR 3 is inside the band, so only the guard acts.


def _digits():
  x, y = load_digits(return_X_y=True)
  return (x / 16.0).astype(np.float32), np.eye(10, dtype=np.float32)[y]


def _mlp_init(seed, sizes=(64, 256, 256, 10)):
  rng = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"w{i}"] = jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
    params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
  return params


def _mlp(params, batch):
  h = batch["x"]
  for i in range(3):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    h = jax.nn.relu(h) if i < 2 else h
  return h


def _mse(params, batch):
  return 0.5 * jnp.mean(jnp.sum(jnp.square(_mlp(params, batch) - batch["y"]), axis=-1))


def _train(opt, steps, batch_size=1024, seed=0):
  x, y = _digits()
  params = _mlp_init(seed)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(_mse)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  history = []
  for _ in range(steps):
    idx = rng.choice(len(x), batch_size, replace=False)
    params, state, loss = step(params, state, {"x": x[idx], "y": y[idx]})
    history.append({"loss": float(loss), **jax.device_get(kstep.stats(state))})
  return history


@pytest.mark.slow
def test_guard_keeps_large_batch_training_finite_and_off_it_diverges():
  make = lambda guard: kstep.k_controlled_sgd(
      3.0, apply_fn=_mlp, target=(0.3, 0.6), guard=guard)
  guarded = _train(make(kstep.Guard(ratio=0.5)), 40)
  assert all(np.isfinite(h["loss"]) for h in guarded)
  assert guarded[-1]["loss"] < 0.5 * guarded[0]["loss"]
  ratios = np.array([h["sharpness_ratio"] for h in guarded])
  assert np.all(ratios <= 0.5 * (1 + 1e-5)), ratios
  assert guarded[-1]["k_num_capped"] > 0
  assert guarded[0]["k"] < 0.3  # the curvature edge binds first: K is held below the band
  unguarded = _train(make(None), 40)
  assert not np.isfinite(unguarded[-1]["loss"])
  assert np.isnan(unguarded[-1]["sharpness_ratio"]) and unguarded[-1]["k_num_capped"] == 0


# ------------------------------------------------------------------------------------------------
# Closed forms on a linear model f = s · x W (C outputs): per-example NTK trace T = C s² ‖x‖².

C, D, B = 3, 5, 8


def _linear(params, batch):
  return batch["s"] * (batch["x"] @ params["w"])


def _batch(seed, n=B, out_scales=None):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D)).astype(np.float32)
  batch = {"x": jnp.asarray(x), "s": jnp.ones((n, 1), jnp.float32)}
  if out_scales is not None:
    batch["s"] = jnp.asarray(out_scales, jnp.float32)[None, :] * jnp.ones((n, 1))
  return batch


def _trace(batch):
  x = np.asarray(batch["x"], np.float64)
  s = np.broadcast_to(np.asarray(batch["s"], np.float64), (len(x), C))
  return np.mean(np.sum(x**2, -1)[:, None] * s**2, 0)  # per-output NTK traces, (C,)


def _run(opt, batches, params=None):
  params = {"w": jnp.zeros((D, C))} if params is None else params
  state = opt.init(params)
  update = jax.jit(opt.update)
  out = []
  for batch in batches:
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = update(grads, state, params, batch=batch)
    out.append(jax.device_get(kstep.stats(state)))
  return out


EXACT = dict(apply_fn=_linear, estimate=kstep.Estimate(estimator="exact"), guard=None,
             momentum=0.0)


@pytest.mark.parametrize("norm", ["per_output", "max_output", "total"])
def test_output_norms_closed_form(norm):
  batch = _batch(0, out_scales=[2.0, 1.0, 0.5])
  per = _trace(batch)
  expected_scale = {"per_output": per.sum() / C, "max_output": per.max(), "total": per.sum()}[norm]
  opt = kstep.scale_by_k_control(100.0, target=(0.4, 0.8), **{
      **EXACT, "estimate": kstep.Estimate(estimator="exact", output_norm=norm)})
  (s,) = _run(opt, [batch])
  np.testing.assert_allclose(s["k_scale"], expected_scale, rtol=1e-5)
  np.testing.assert_allclose(s["k_trace"], per.sum(), rtol=1e-5)  # always the total T
  assert s["k_num_outputs"] == C
  np.testing.assert_allclose(s["k_learning_rate"], 0.8 * 2 * B / expected_scale, rtol=1e-5)
  np.testing.assert_allclose(s["k"], 0.8, rtol=1e-5)


def test_auto_norm_per_loss():
  assert kstep.Estimate().output_norm == "auto"
  assert k_estimate.resolve_output_norm("auto", "mse") == "per_output"
  assert k_estimate.resolve_output_norm("auto", lambda o, b: o.sum(-1)) == "per_output"
  assert k_estimate.resolve_output_norm("auto", "softmax_cross_entropy") == "total"
  with pytest.raises(ValueError, match="`Estimate.output_norm`"):
    kstep.Estimate(output_norm="mean")


def test_decay_steps_anneals_both_band_ends():
  batch = _batch(1)
  eta1 = 2 * B / (_trace(batch).sum() / C)
  steps = 12
  hist = _run(kstep.scale_by_k_control(100.0, decay_steps=steps, target=(0.4, 0.8), **EXACT),
              [batch] * (steps + 2))
  d = np.asarray([optax.cosine_decay_schedule(1.0, steps)(t) for t in range(steps + 2)])
  lr = np.array([h["k_learning_rate"] for h in hist])
  np.testing.assert_allclose(lr, 0.8 * d * eta1, rtol=1e-5, atol=1e-12)  # base LR 100: top edge
  low = _run(kstep.scale_by_k_control(1e-6, decay_steps=steps, target=(0.4, 0.8), **EXACT),
             [batch] * steps)
  np.testing.assert_allclose([h["k_learning_rate"] for h in low], 0.4 * d[:steps] * eta1,
                             rtol=1e-5, atol=1e-12)
  # Any schedule of the step count as the multiplier.
  sched = optax.linear_schedule(1.0, 0.5, steps)
  hist = _run(kstep.scale_by_k_control(100.0, decay_steps=sched, target=(0.4, 0.8), **EXACT),
              [batch] * 4)
  np.testing.assert_allclose([h["k_learning_rate"] for h in hist],
                             [0.8 * float(sched(t)) * eta1 for t in range(4)], rtol=1e-5)
  for bad in (0, 0.5, "cosine"):
    with pytest.raises(ValueError, match="`decay_steps`"):
      kstep.k_controlled_sgd(0.1, apply_fn=_linear, decay_steps=bad)


def test_batch_size_from_the_batch_and_mismatch_names_both():
  full, short = _batch(2), _batch(3, n=5)
  opt = kstep.scale_by_k_control(100.0, target=(0.4, 0.8), **EXACT)
  for batch, n in ((full, B), (short, 5)):
    (s,) = _run(opt, [batch])
    np.testing.assert_allclose(s["k_learning_rate"], 0.8 * 2 * n / (_trace(batch).sum() / C),
                               rtol=1e-5)
  given = kstep.scale_by_k_control(100.0, batch_size=B, target=(0.4, 0.8), **EXACT)
  _run(given, [full])
  with pytest.raises(ValueError, match=r"`batch_size` is 8 but this batch has 5 examples"):
    _run(given, [short])


def test_guard_skips_bad_lambda_and_reports_nan_before_any():
  good, bad = _batch(4), _batch(5)
  bad["x"] = bad["x"].at[0, 0].set(jnp.nan)
  opt = kstep.scale_by_k_control(100.0, apply_fn=_linear, target=(0.4, 0.8),
                                 estimate=kstep.Estimate(estimator="exact", every=1),
                                 guard=kstep.Guard(ratio=0.5))
  first_bad = _run(opt, [bad])
  assert np.isnan(first_bad[0]["gn_lambda_max"]) and np.isnan(first_bad[0]["sharpness_ratio"])
  assert first_bad[0]["sharpness_num_skipped"] == 1 and first_bad[0]["k_num_skipped"] == 1
  assert np.isnan(first_bad[0]["k"]) and np.isnan(first_bad[0]["k_trace"])
  assert first_bad[0]["k_learning_rate"] == np.float32(100.0)  # no estimate: the base LR
  hist = _run(opt, [good, bad, good])
  # GN matrix of the linear model: x xᵀ/B ⊗ I, λ_max = top eigenvalue of XᵀX/B.
  x = np.asarray(good["x"], np.float64)
  lam = np.linalg.eigvalsh(x.T @ x / B)[-1]
  np.testing.assert_allclose(hist[0]["gn_lambda_max"], lam, rtol=1e-3)
  assert hist[1]["gn_lambda_max"] == hist[0]["gn_lambda_max"]  # NaN batch: kept
  assert hist[1]["k_learning_rate"] == hist[0]["k_learning_rate"]
  assert hist[1]["sharpness_num_skipped"] == 1
  # The cap: η λ = 0.5 · 2 (plain SGD), below the band's step here.
  np.testing.assert_allclose(hist[0]["k_learning_rate"], 0.5 * 2 / lam, rtol=1e-3)
  np.testing.assert_allclose(hist[0]["sharpness_ratio"], 0.5, rtol=1e-5)
  assert hist[-1]["k_num_capped"] == 3


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1, "high"])
def test_guard_ratio_range(value):
  with pytest.raises(ValueError, match=r"`Guard.ratio`.*\(0.0, 1.0\]"):
    kstep.Guard(ratio=value)


def test_guard_holds_lambda_against_a_lower_estimate():
  sharp, flat = _batch(6), _batch(7)
  sharp["x"] = 3.0 * sharp["x"]  # λ ×9
  opt = kstep.scale_by_k_control(100.0, apply_fn=_linear, target=(0.4, 0.8),
                                 estimate=kstep.Estimate(estimator="exact", every=1),
                                 guard=kstep.Guard(ratio=0.5))
  hist = _run(opt, [sharp] + [flat] * 24)
  top = lambda b: np.linalg.eigvalsh(np.asarray(b["x"], np.float64).T @ np.asarray(b["x"]) / B)[-1]
  lam_sharp, lam_flat = top(sharp), top(flat)
  np.testing.assert_allclose(hist[0]["gn_lambda_max"], lam_sharp, rtol=1e-3)
  # At the cap with λ̂ falling (steady), the power steps skip the odd-numbered estimates from
  # update 3 on: by update t ≥ 1 the hold has decayed 1 + t // 2 times.
  expected = [max(lam_flat, 0.8 ** (1 + t // 2) * lam_sharp) for t in range(1, 25)]
  np.testing.assert_allclose([h["gn_lambda_max"] for h in hist[1:]], expected, rtol=2e-3)
  assert hist[-1]["gn_lambda_max"] == pytest.approx(lam_flat, rel=2e-3)  # released in the end
