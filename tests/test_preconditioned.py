"""K control after a diagonal preconditioner (kstep.k_controlled_adam and its general form).

References: dense per-example Jacobians and ``jnp.linalg.eigh`` of the explicit
``P^{-1/2} G P^{-1/2}``; Adam's moments recomputed in NumPy; a float64 NumPy simulation of
EMA-momentum preconditioned SGD with a frozen P on a linear C-output model (its divergence step);
optax's own ``adamw`` for the update's direction.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from control_helpers import diverges_on_quadratic
from jax.flatten_util import ravel_pytree

import kstep
from kstep._src import k_estimate, losses
from kstep._src.estimators import linearization, traces


def _mlp(params, batch):
  h = jnp.tanh(batch["x"] @ params["w0"] + params["b0"])
  return h @ params["w1"] + params["b1"]


def _problem(seed=0, n=12, d=5, hidden=7, c=3):
  rng = np.random.default_rng(seed)
  params = {"w0": rng.normal(size=(d, hidden)) / np.sqrt(d), "b0": 0.1 * rng.normal(size=hidden),
            "w1": rng.normal(size=(hidden, c)) / np.sqrt(hidden), "b1": np.zeros(c)}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  batch = {"x": jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
           "y": jnp.asarray(np.eye(c)[rng.integers(0, c, n)], jnp.float32)}
  diag = jax.tree.map(lambda a: jnp.asarray(np.exp(rng.uniform(-1.5, 1.5, a.shape)), jnp.float32),
                      params)
  return params, batch, diag


def _dense(params, batch, diag, loss):
  """(T_P per example over all outputs, λ_max of P^{-1/2} G P^{-1/2}) in float64."""
  flat, unravel = ravel_pytree(params)
  jac = np.asarray(jax.jacrev(lambda f: _mlp(unravel(f), batch))(flat), np.float64)  # (n, C, P)
  out = np.asarray(_mlp(params, batch), np.float64)
  n, c, _ = jac.shape
  if loss == "mse":
    h = np.broadcast_to(np.eye(c), (n, c, c))
  else:
    p = np.exp(out - out.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = np.stack([np.diag(q) - np.outer(q, q) for q in p])
  s = 1.0 / np.sqrt(np.asarray(ravel_pytree(diag)[0], np.float64))
  jp = jac * s  # J P^{-1/2}
  trace = np.mean(np.einsum("nab,nak,nbk->n", h, jp, jp))
  g = np.einsum("nak,nab,nbl->kl", jp, h, jp) / n
  return trace, np.linalg.eigh(g)[0][-1]


@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_preconditioned_trace_and_lambda_match_dense_references(loss):
  params, batch, diag = _problem()
  trace, lam = _dense(params, batch, diag, loss)
  inv_sqrt = jax.tree.map(lambda p: 1.0 / jnp.sqrt(p), diag)
  spec = losses.resolve_loss(loss)
  common = dict(loss=spec, output_norm="total", inv_sqrt=inv_sqrt)
  exact = jax.jit(lambda: k_estimate.estimate(
      _mlp, params, batch, key=jax.random.key(0), estimator="exact",
      eigenvector=jax.tree.map(jnp.ones_like, params), power_iters=300, **common))()
  assert float(exact.trace) == pytest.approx(trace, rel=1e-4)
  assert float(exact.lambda_max) == pytest.approx(lam, rel=1e-3)
  # Hutchinson: unbiased; the mean of 2000 probes within 4 standard errors of the dense trace.
  hutch = jax.jit(lambda k: kstep_trace(params, batch, spec, inv_sqrt, k))(jax.random.key(1))
  assert abs(float(hutch.value) - trace) < 4 * float(hutch.stderr), (hutch, trace)
  # Without the preconditioner the estimate is a different number (the test can fail).
  plain = jax.jit(lambda: k_estimate.estimate(_mlp, params, batch, key=jax.random.key(0),
                                              estimator="exact", loss=spec,
                                              output_norm="total"))()
  assert abs(float(plain.trace) - trace) > 0.05 * trace


def kstep_trace(params, batch, spec, inv_sqrt, key):
  lin = linearization.precondition(linearization.linearize(_mlp, params, batch), inv_sqrt)
  return traces.hutchinson_trace(lin, spec, batch, key=key, num_probes=2000)


def _adam_diag(grads_seq, b2, eps):
  """P = √v̂ + ε after the gradients in ``grads_seq`` (NumPy, float64), each leaf floored at 0.1
  of its mean as kstep's estimate does (docs/design.md, "Adaptive optimizers")."""
  def leaf(*gs):
    nu = 0.0
    for g in gs:
      nu = b2 * nu + (1 - b2) * np.asarray(g, np.float64) ** 2
    p = np.sqrt(nu / (1 - b2 ** len(gs))) + eps
    return np.maximum(p, 0.1 * p.mean())
  return ravel_pytree(jax.tree.map(leaf, *grads_seq))[0]


def test_adam_controller_reads_p_from_adams_state_at_the_step_taken():
  params, batch, _ = _problem(seed=1)
  loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.sum((_mlp(p, b) - b["y"]) ** 2, -1))
  b1, b2, eps, lr = 0.9, 0.99, 1e-3, 30.0
  opt = kstep.k_controlled_adam(lr, apply_fn=_mlp, b1=b1, b2=b2, eps=eps, guard=kstep.Guard(),
                                estimate=kstep.Estimate(every=1, estimator="exact",
                                                        smoothing=0.0))
  state = opt.init(params)
  ref = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  ref_state = ref.init(params)
  grads_seq, dense = [], []
  update = jax.jit(lambda g, s, p: opt.update(g, s, p, batch=batch))
  for _ in range(3):
    grads = jax.grad(loss_fn)(params, batch)
    grads_seq.append(grads)
    # Dense references at the params this update sees and P after its gradient (NumPy Adam).
    diag = ravel_pytree(params)[1](jnp.asarray(_adam_diag(grads_seq, b2, eps), jnp.float32))
    dense.append(_dense(params, batch, diag, "mse"))
    updates, state = update(grads, state, params)
    direction, ref_state = ref.update(grads, ref_state, params)
    params = optax.apply_updates(params, updates)
  s = kstep.stats(state)
  eta = float(s["k_learning_rate"])
  # The step is Adam's direction times −η.
  np.testing.assert_allclose(ravel_pytree(updates)[0], -eta * ravel_pytree(direction)[0],
                             rtol=1e-5, atol=1e-8)
  # K_P = η S_P / (2B), S_P per output with P of the step taken (no smoothing: this step's).
  trace = dense[-1][0]
  b, c = 12, 3
  assert float(s["k_trace"]) == pytest.approx(trace, rel=1e-3)
  assert float(s["k"]) == pytest.approx(eta * trace / c / (2 * b), rel=1e-3)
  # The band's top (1.1) or the guard's cap 0.25 · 38 / λ̄, whichever is lower, from base LR 30;
  # λ̄ is a lower bound held from one of the steps' preconditioned λ_max.
  edge = 2 * (1 + b1) / (1 - b1)
  assert float(kstep.curvature_edge(b1, ema=True)) == pytest.approx(edge)
  assert float(s["sharpness_ratio"]) == pytest.approx(eta * float(s["gn_lambda_max"]) / edge,
                                                      rel=1e-5)
  expected = min(1.1 * 2 * b / (trace / c), 0.25 * edge / float(s["gn_lambda_max"]))
  assert eta == pytest.approx(expected, rel=1e-4)
  lams = [lam for _, lam in dense]
  assert min(lams) * 0.5 <= float(s["gn_lambda_max"]) <= max(lams) * (1 + 1e-4), lams


# ------------------------------------------------------------------------------------------------
# The physics, float64: EMA-momentum SGD with a frozen diagonal P on f_c(x) = <θ_c, x>.


def _diverges(x, diag, eta, beta, batch, steps, runs, rng):
  n, _ = x.shape
  theta = rng.normal(size=(runs,) + diag.shape)
  m = np.zeros_like(theta)
  loss = lambda th: np.sum(np.einsum("np,rcp->rnc", x, th) ** 2)
  start = loss(theta)
  with np.errstate(over="ignore", invalid="ignore"):
    for _ in range(steps):
      idx = np.stack([rng.choice(n, batch, replace=False) for _ in range(runs)])
      xb = x[idx]
      g = np.einsum("rbp,rbc->rcp", xb, np.einsum("rbp,rcp->rbc", xb, theta)) / batch
      m = beta * m + (1 - beta) * g
      theta = theta - eta * m / diag
      if not np.all(np.isfinite(theta)):
        return True
    return not loss(theta) <= start


def _divergence_step(x, diag, beta, batch, seed, runs):
  rng = np.random.default_rng(seed)
  lo, hi = 1e-4, 10.0
  for _ in range(14):
    mid = np.sqrt(lo * hi)
    if _diverges(x, diag, mid, beta, batch, 2000, runs, rng):
      hi = mid
    else:
      lo = mid
  return np.sqrt(lo * hi)


@pytest.mark.parametrize("batch", [5, 100])
def test_simulated_edge_is_k_p_one_at_small_batch_and_the_adaptive_edge_at_full_batch(batch):
  n, p, c, beta = 100, 120, 2, 0.9
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, p))
  diag = np.exp(rng.uniform(-1.5, 1.5, size=(c, p)))
  eta = _divergence_step(x, diag, beta, batch, seed=1, runs=4 if batch < n else 1)
  # kstep's own numbers for the same model (float32, exact Jacobians, power steps).
  apply_fn = lambda th, b: jnp.einsum("np,cp->nc", b["x"], th["t"])
  params = {"t": jnp.zeros((c, p), jnp.float32)}
  inv_sqrt = {"t": jnp.asarray(1 / np.sqrt(diag), jnp.float32)}
  est = k_estimate.estimate(apply_fn, params, {"x": jnp.asarray(x, jnp.float32)},
                            loss=losses.resolve_loss("mse"), key=jax.random.key(0),
                            output_norm="per_output", estimator="exact", inv_sqrt=inv_sqrt,
                            eigenvector={"t": jnp.ones((c, p))}, power_iters=500)
  k_p = float(kstep.k_from_trace(eta, batch, est.scale))  # α = 1: K_P = η S_P / (2B)
  ratio = eta * float(est.lambda_max) / float(kstep.curvature_edge(beta, ema=True))
  if batch == 5:
    assert 0.75 <= k_p <= 1.1, (eta, k_p)
    assert ratio < 0.1  # the curvature edge is far away at small batch
  else:
    assert ratio == pytest.approx(1.0, abs=0.02), (eta, ratio)
    assert k_p > 2.0  # K_P is not what binds at full batch


# ------------------------------------------------------------------------------------------------
# The optimizer: optax's contract, errors, training.


def test_k_controlled_adam_is_adamw_with_the_controllers_step():
  params, batch, _ = _problem(seed=2)
  loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.sum((_mlp(p, b) - b["y"]) ** 2, -1))
  # A band too wide to bind and no guard: the controller passes the base LR through.
  opt = kstep.k_controlled_adam(1e-3, apply_fn=_mlp, weight_decay=0.1, target=(1e-9, 1e9),
                                guard=None)
  state = opt.init(params)
  ref = optax.adamw(1e-3, weight_decay=0.1)
  ref_state = ref.init(params)
  update = jax.jit(lambda g, s, p: opt.update(g, s, p, batch=batch))
  for _ in range(4):
    grads = jax.grad(loss_fn)(params, batch)
    u, state = update(grads, state, params)
    v, ref_state = ref.update(grads, ref_state, params)
    np.testing.assert_allclose(ravel_pytree(u)[0], ravel_pytree(v)[0], rtol=1e-5, atol=1e-9)
    params = optax.apply_updates(params, u)
  assert float(kstep.stats(state)["k_learning_rate"]) == pytest.approx(1e-3)


def test_rms_preconditioner_reads_its_diagonal():
  params, batch, diag_unused = _problem(seed=3)
  del diag_unused
  pre = kstep.rms_preconditioner(0.9, eps=1e-3, bias_correction=True)
  grads = jax.grad(lambda p: jnp.sum(_mlp(p, batch) ** 2))(params)
  _, st = pre.transform.update(grads, pre.transform.init(params), params)
  got = ravel_pytree(pre.diagonal(st))[0]
  expected = np.abs(np.asarray(ravel_pytree(grads)[0], np.float64)) + 1e-3
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(b1=1.0), "`b1` must be a number in \\[0, 1\\)"),
    (dict(b2=-0.1), "`b2` must be a number in \\[0, 1\\)"),
    (dict(eps=-1.0), "`eps` must be a number >= 0"),
    (dict(weight_decay=-1.0), "`weight_decay` must be >= 0"),
    (dict(learning_rate=0.0), "learning_rate"),
])
def test_bad_arguments_name_themselves(kwargs, match):
  args = dict(learning_rate=1e-3, apply_fn=_mlp)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    kstep.k_controlled_adam(args.pop("learning_rate"), **args)


def test_fused_probe_and_missing_batch_are_refused_clearly():
  params, batch, _ = _problem()
  opt = kstep.k_controlled_adam(1e-3, apply_fn=_mlp)
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match="batch=batch"):
    opt.update(grads, state, params)
  with pytest.raises(ValueError, match="without `probe=`"):
    opt.update(grads, state, params, batch=batch, probe=object())
  with pytest.raises(ValueError, match="kstep.Preconditioner"):
    kstep.scale_by_preconditioned_k_control(optax.scale_by_adam(), 1e-3, apply_fn=_mlp)
  with pytest.raises(ValueError, match="kstep.Preconditioner.*or None"):
    kstep.track_k(_mlp, learning_rate=1e-3, preconditioner=optax.scale_by_adam())


def test_adam_controller_trains_at_any_base_lr_without_host_transfers():
  params0, batch, _ = _problem(seed=4, n=64)
  loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.sum((_mlp(p, b) - b["y"]) ** 2, -1))

  @jax.jit
  def run(lr, params):  # the base LR traced: one compilation for the three
    opt = kstep.k_controlled_adam(lr, apply_fn=_mlp, decay_steps=150)

    def body(carry, _):
      p, s = carry
      g = jax.grad(loss_fn)(p, batch)
      u, s = opt.update(g, s, p, batch=batch)
      return (optax.apply_updates(p, u), s), None

    params, state = jax.lax.scan(body, (params, opt.init(params)), None, length=150)[0]
    s = kstep.stats(state)
    return loss_fn(params, batch), s["k"], s["sharpness_ratio"]

  lrs = [jnp.float32(lr) for lr in (1e-5, 1e-1, 10.0)]
  run(lrs[0], params0)  # compile
  finals = []
  with jax.transfer_guard("disallow"):
    outs = [run(lr, params0) for lr in lrs]
  for final, k, ratio in outs:
    finals.append(float(final))
    assert np.isfinite(float(k)) and float(ratio) < 1.0
  start = float(loss_fn(params0, batch))
  assert max(finals) < 0.5 * start, (start, finals)
  assert max(finals) / min(finals) < 2.0, finals  # the base LR barely matters


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_ema_curvature_edge_matches_ema_momentum_on_a_quadratic(beta):
  """``m ← β m + (1 − β) λθ``, ``θ ← θ − η m`` (optax.ema without debiasing): stable at 0.98 of
  ``curvature_edge(β, ema=True)/λ``, divergent at 1.02."""
  lam = 3.0
  edge = float(kstep.curvature_edge(beta, ema=True))
  assert edge == pytest.approx(2 * (1 + beta) / (1 - beta), rel=1e-6)

  diverges = lambda eta: diverges_on_quadratic(
      optax.chain(optax.ema(beta, debias=False), optax.scale(-eta)), lam)

  assert not diverges(0.98 * edge / lam)
  assert diverges(1.02 * edge / lam)


# ------------------------------------------------------------------------------------------------
# The diagnostics with Adam's preconditioner.


def test_trackers_measure_the_preconditioned_kernel_and_curvature():
  params, batch, _ = _problem(seed=5)
  loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.sum((_mlp(p, b) - b["y"]) ** 2, -1))
  b1, b2, eps, lr = 0.9, 0.99, 1e-3, 1e-2
  opt = optax.chain(
      kstep.track_k(_mlp, learning_rate=lr, estimator="exact", every=1, decay=0.0,
                    preconditioner=kstep.adam_preconditioner(b1, b2, eps)),
      optax.scale_by_learning_rate(lr))
  lam_opt = optax.chain(
      kstep.track_lambda_max(loss_fn, every=1, learning_rate=lr, num_iters=40,
                             preconditioner=kstep.adam_preconditioner(b1, b2, eps)),
      optax.scale_by_learning_rate(lr))
  ref = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  state, lam_state, ref_state = opt.init(params), lam_opt.init(params), ref.init(params)
  update = jax.jit(lambda g, s, p: opt.update(g, s, p, batch=batch))
  lam_update = jax.jit(lambda g, s, p: lam_opt.update(g, s, p, batch=batch))
  grads_seq = []
  for _ in range(2):
    grads = jax.grad(loss_fn)(params, batch)
    grads_seq.append(grads)
    diag = ravel_pytree(params)[1](jnp.asarray(_adam_diag(grads_seq, b2, eps), jnp.float32))
    trace, _ = _dense(params, batch, diag, "mse")
    u, state = update(grads, state, params)
    _, lam_state = lam_update(grads, lam_state, params)
    v, ref_state = ref.update(grads, ref_state, params)
    np.testing.assert_allclose(ravel_pytree(u)[0], ravel_pytree(v)[0], rtol=1e-5, atol=1e-9)
    # The Hessian (not Gauss–Newton) in φ: eigh of P^{-1/2} H P^{-1/2}, dense.
    flat, unravel = ravel_pytree(params)
    h = np.asarray(jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat), np.float64)
    s = 1 / np.sqrt(np.asarray(ravel_pytree(diag)[0], np.float64))
    lam = np.linalg.eigh(s[:, None] * h * s[None, :])[0][-1]
    params = optax.apply_updates(params, u)
  st = kstep.stats(state)
  assert float(st["k_trace"]) == pytest.approx(trace, rel=1e-4)
  assert float(st["k"]) == pytest.approx(lr * trace / 3 / (2 * 12), rel=1e-4)  # α = 1 (EMA)
  ls = kstep.stats(lam_state)
  assert float(ls["lambda_max"]) == pytest.approx(lam, rel=1e-3)
  assert float(ls["lambda_max_edge_ratio"]) == pytest.approx(lr * lam / 38.0, rel=1e-3)
  with pytest.raises(ValueError, match="`momentum` must be 0"):
    kstep.track_k(_mlp, learning_rate=lr, momentum=0.9,
                  preconditioner=kstep.adam_preconditioner())


def test_inject_hyperparams_exposes_adams_hyperparameters():
  params, batch, _ = _problem(seed=6)
  loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.sum((_mlp(p, b) - b["y"]) ** 2, -1))
  opt = kstep.inject_hyperparams(kstep.k_controlled_adam)(1e-3, apply_fn=_mlp, weight_decay=0.01)
  state = opt.init(params)
  assert set(state.hyperparams) == {"learning_rate", "b1", "b2", "eps", "weight_decay"}
  plain = kstep.k_controlled_adam(1e-3, apply_fn=_mlp, weight_decay=0.01)
  grads = jax.grad(loss_fn)(params, batch)
  u, state = jax.jit(lambda g, s: opt.update(g, s, params, batch=batch))(grads, state)
  v, _ = plain.update(grads, plain.init(params), params, batch=batch)
  np.testing.assert_allclose(ravel_pytree(u)[0], ravel_pytree(v)[0], rtol=3e-5, atol=1e-9)


def test_quickstart_with_adam_trains_at_a_base_lr_far_too_large():
  from conftest import load_example

  accuracy = load_example("quickstart").main(["--adam", "--steps", "200"])
  assert accuracy > 0.9


@pytest.mark.slow
def test_language_model_example_learns_bytes():
  """examples/language_model.py: (B, T, 256) logits through k_controlled_adam; 120 steps bring
  validation well below a uniform guess's 8 bits per byte."""
  from conftest import load_example

  bits = load_example("language_model").main(["--steps", "120"])
  assert 0 < bits < 5.0
