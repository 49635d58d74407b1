"""Tests of kstep._src.noise_kernel against independent float64 numpy references.

Conventions are those of docs/design.md and the K paper (Agarwala & Pennington
2024): D = N examples, Θ̂ = J Jᵀ / N = V Λ Vᵀ, β = B/N, β̃ = (B − 1)/(N − 1), r = β̃/β, and SGD on
the linear model is eq. 4–5: θ ← θ − (η/B) J_Bᵀ z_B, i.e. z ← z − (η/B) J J_Bᵀ z_B. Every
reference below is written from the paper's formulas in plain numpy; none calls kstep's helpers.

Exact facts used as checks (beyond the paper's high-dimensional orderings, which need not hold at
N = 100; see docs/design.md, "The noise kernel norm", and test_orderings_*):
* K_tr ≤ K_HD term by term (λ/(2 − ηλ) ≥ λ/2).
* Theorem 2.1: with ‖A‖ < 1, K < 1 ⟺ λ_max(A + B) < 1.
* λ_max(A + B) ≤ ρ(T): in the Λ^{1/2}-conjugated form of eq. 30 the operator is symmetric, and
  A + B is its compression to diagonal matrices. Hence K ≥ 1 ⟹ ρ(T) ≥ 1 (no convergence).
* Finite-N lower bound: C = (V∘V)ᵀ(V∘V) has Σ_bm y_b C_bm y_m = Σ_a (Σ_b V_ab² y_b)² ≥ (Σ_b y_b)²/N,
  so with 1 − a = ηλ(2 − rηλ): K ≥ (1 − β̃) (η/B) Σ_a λ_a / (2 − r η λ_a). As N → ∞ at fixed B this
  is K_HD; at finite N it is (1 − β̃) K_tr at small η, so K can fall (slightly) below K_tr.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kstep
from kstep._src import noise_kernel

RTOL = 1e-4  # kstep computes in float32


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
  """The matrices here are ~100×100: a multi-threaded BLAS only adds contention (on a loaded
  2-core machine, 100× slower eigh)."""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    yield
    return
  jnp.linalg.eigh(jnp.eye(2)).eigenvalues.block_until_ready()  # load jaxlib's LAPACK first
  with threadpool_limits(limits=1, user_api="blas"):
    yield


# ----------------------------------------------------------------------------------------------
# NTKs of Appendix A.4 (D = N, P = 1.2 N) and Figure 1.


def _flat(rng, n, p):
  """Flat spectrum: J i.i.d. N(0, 1), Θ̂ = J Jᵀ / N (Marchenko–Pastur)."""
  j = rng.standard_normal((n, p))
  return j @ j.T / n


def _haar(rng, n):
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))


def _dispersed(rng, n, p=None):
  """Dispersed spectrum: λ_a = 1/(a² + 1), a = 1..N, Haar-random eigenvectors."""
  del p
  lam = 1.0 / (np.arange(1, n + 1) ** 2 + 1.0)
  v = _haar(rng, n)
  return (v * lam) @ v.T


def _localized(rng, n, p):
  """Localized eigenvectors: Θ̂ = diag(|s|) + J0 J0ᵀ / N, s ~ N(0, 0.1²), J0 i.i.d. N(0, 1)."""
  s = 0.1 * rng.standard_normal(n)
  j0 = rng.standard_normal((n, p))
  return np.diag(np.abs(s)) + j0 @ j0.T / n


SETTINGS = {"flat": _flat, "dispersed": _dispersed, "localized": _localized}


def _ntk(name, n=100, seed=1):
  return SETTINGS[name](np.random.default_rng(seed), n, int(1.2 * n))


def _fig1_jacobian():
  # The draw docs/design.md quotes (K ≈ 0.87 at η = 0.07, ≈ 1.01 at η = 0.08, K_HD 1.054).
  return np.random.default_rng(0).standard_normal((100, 120))


# ----------------------------------------------------------------------------------------------
# Independent float64 references.


def _fractions(n, b):
  return b / n, (b - 1.0) / (n - 1.0)


def _ref_k_tr(eta, b, trace, momentum=0.0):
  return eta / (2.0 * (1.0 - momentum) * b) * trace  # eq. 11 / 18


def _ref_k_hd(eta, b, lam):
  lam = np.asarray(lam, np.float64)
  if np.any(eta * lam >= 2.0):
    return np.inf
  return eta / b * np.sum(lam / (2.0 - eta * lam))  # eq. 10


def _ref_ab(ntk, eta, b, tol=1e-9):
  """Diagonal of A and matrix B of Theorem 2.1 / eq. 32, on the modes with λ > 0."""
  n = ntk.shape[0]
  beta, beta_t = _fractions(n, b)
  lam, v = np.linalg.eigh(ntk)
  keep = lam > tol * lam.max()
  lam, v = lam[keep], v[:, keep]
  a = (1.0 - eta * lam) ** 2 + (beta_t / beta - 1.0) * eta**2 * lam**2
  c = np.einsum("ab,am->bm", v**2, v**2)  # C_bm = Σ_a V_ab² V_am²
  bm = (1.0 - beta_t) / beta * eta**2 * np.einsum("b,bm,m->bm", lam, c, lam)
  return a, bm


def _ref_k_exact(ntk, eta, b):
  a, bm = _ref_ab(ntk, eta, b)
  if np.max(np.abs(a)) >= 1.0:
    return np.inf
  return float(np.max(np.linalg.eigvals(np.linalg.solve(np.diag(1.0 - a), bm)).real))


def _ref_ab_max(ntk, eta, b):
  a, bm = _ref_ab(ntk, eta, b)
  return float(np.max(np.linalg.eigvals(np.diag(a) + bm).real))


def _ref_k_lower_bound(ntk, eta, b):
  n = ntk.shape[0]
  beta, beta_t = _fractions(n, b)
  lam = np.linalg.eigvalsh(ntk)
  return (1.0 - beta_t) * eta / b * np.sum(lam / (2.0 - beta_t / beta * eta * lam))


def _ref_apply_t(ntk, eta, b, s):
  """Eq. 26 applied to one N×N matrix S."""
  n = ntk.shape[0]
  beta, beta_t = _fractions(n, b)
  return (
      s - eta * (ntk @ s + s @ ntk) + beta_t / beta * eta**2 * ntk @ s @ ntk
      + (1.0 - beta_t) / beta * eta**2 * ntk @ np.diag(np.diag(s)) @ ntk
  )


def _ref_t_dense(ntk, eta, b):
  """The N²×N² matrix of eq. 26, one column per basis matrix E_ij (row-major vec)."""
  n = ntk.shape[0]
  cols = []
  for i, j in itertools.product(range(n), range(n)):
    e = np.zeros((n, n))
    e[i, j] = 1.0
    cols.append(_ref_apply_t(ntk, eta, b, e).ravel())
  return np.stack(cols, axis=1)


def _ref_growth(ntk, eta, b):
  """max |λ| of eq. 26 on symmetric matrices (the covariances), from the dense operator."""
  n = ntk.shape[0]
  basis = []
  for i in range(n):
    for j in range(i, n):
      e = np.zeros((n, n))
      e[i, j] = e[j, i] = 1.0
      basis.append(e.ravel() / np.linalg.norm(e))
  q = np.stack(basis, axis=1)  # orthonormal basis of Sym(N) inside R^{N²}; T maps Sym to Sym
  t = _ref_t_dense(ntk, eta, b)
  assert np.allclose(q @ (q.T @ t @ q), t @ q)
  return float(np.max(np.abs(np.linalg.eigvals(q.T @ t @ q))))


_growth = jax.jit(kstep.second_moment_growth)
_k_exact = jax.jit(kstep.k_exact)


def _k(ntk, eta, b):
  return float(_k_exact(jnp.asarray(ntk, jnp.float32), eta, b))


def _g(ntk, eta, b):
  return float(_growth(jnp.asarray(ntk, jnp.float32), eta, b))


# ----------------------------------------------------------------------------------------------
# The formulas against their references.


@pytest.mark.parametrize(
    "eta,b,trace,momentum",
    [(0.07, 5, 119.8, 0.0), (1e-3, 128, 3226.0, 0.9), (0.3, 1, 2.5, 0.5), (3.0, 64, 1e-3, 0.99)],
)
def test_k_from_trace(eta, b, trace, momentum):
  got = float(kstep.k_from_trace(eta, b, trace, momentum))
  # The ½ of eq. 11 (eq. 52's η/B · tr is the typo docs/design.md names).
  np.testing.assert_allclose(got, _ref_k_tr(eta, b, trace, momentum), rtol=RTOL)
  if momentum == 0.0:
    np.testing.assert_allclose(float(kstep.k_from_trace(eta, b, trace)), got, rtol=1e-7)


def test_k_from_trace_broadcasts():
  eta = np.array([0.01, 0.1, 1.0])
  got = np.asarray(kstep.k_from_trace(eta[:, None], 8, np.array([1.0, 10.0]), 0.9))
  np.testing.assert_allclose(got, _ref_k_tr(eta[:, None], 8, np.array([1.0, 10.0]), 0.9),
                             rtol=RTOL)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_k_high_dim(name):
  ntk = _ntk(name)
  lam = np.linalg.eigvalsh(ntk)
  for frac in [1e-4, 0.1, 0.5, 0.9, 0.99]:
    eta = frac * 2.0 / lam.max()
    got = float(kstep.k_high_dim(eta, 5, lam.astype(np.float32)))
    np.testing.assert_allclose(got, _ref_k_hd(eta, 5, lam), rtol=RTOL)
  # Past the deterministic edge η λ_max ≥ 2 the formula does not apply: inf.
  for frac in [1.01, 1.5, 3.0]:
    assert float(kstep.k_high_dim(frac * 2.0 / lam.max(), 5, lam)) == np.inf


@pytest.mark.parametrize("name", list(SETTINGS))
def test_k_exact(name):
  ntk = _ntk(name)
  n = ntk.shape[0]
  lam_max = np.linalg.eigvalsh(ntk).max()
  beta, beta_t = _fractions(n, 5)
  r = beta_t / beta
  for frac in [1e-3, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 1.05, 0.98 / r]:
    eta = frac * 2.0 / lam_max
    want = _ref_k_exact(ntk, eta, 5)
    assert np.isfinite(want)
    np.testing.assert_allclose(_k(ntk, eta, 5), want, rtol=RTOL, err_msg=f"eta={eta}")
    if frac >= 1.0:
      # Past η λ_max = 2 the diagonal entry of A + B is ≥ (1 − ηλ)² > 1 (r + (1 − β̃)/B = 1),
      # so K > 1 flags the deterministic edge as well, though ‖A‖ < 1 up to η λ_max = 2/r.
      assert want > 1.0
  # ‖A‖ ≥ 1 (a = 1 − 2x + r x² ≥ 1 once x = η λ_max ≥ 2/r): inf.
  for frac in [1.01 / r, 1.5 / r]:
    assert _ref_k_exact(ntk, frac * 2.0 / lam_max, 5) == np.inf
    assert _k(ntk, frac * 2.0 / lam_max, 5) == np.inf


def test_k_exact_other_batch_sizes():
  ntk = _ntk("flat", n=40)
  lam_max = np.linalg.eigvalsh(ntk).max()
  for b in [1, 2, 7, 39]:
    for frac in [0.05, 0.3]:
      eta = frac * 2.0 / lam_max
      np.testing.assert_allclose(_k(ntk, eta, b), _ref_k_exact(ntk, eta, b), rtol=RTOL)
  # Full batch: no noise, K = 0.
  assert _k(ntk, 0.5 / lam_max, 40) == pytest.approx(0.0, abs=1e-6)


def test_k_exact_small_learning_rate_is_not_inf():
  # Regression: 1 − A was formed as 1 − (1 − ηλ)² − …, which rounds to 0 in float32 once
  # ηλ ≲ 6e-8 and made a stable system report K = inf.
  ntk = _ntk("dispersed")  # λ_min ≈ 1e-4
  for eta in [1e-7, 1e-5, 1e-4]:
    got = _k(ntk, eta, 5)
    np.testing.assert_allclose(got, _ref_k_exact(ntk, eta, 5), rtol=1e-3)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_exact_relations(name):
  """The relations that hold exactly at any N (module docstring)."""
  ntk = _ntk(name)
  n = ntk.shape[0]
  lam = np.linalg.eigvalsh(ntk)
  _, beta_t = _fractions(n, 5)
  ks = []
  for frac in [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97]:
    eta = frac * 2.0 / lam.max()
    k = _k(ntk, eta, 5)
    k_hd = float(kstep.k_high_dim(eta, 5, lam))
    k_tr = float(kstep.k_from_trace(eta, 5, lam.sum()))
    assert k_tr <= k_hd * (1 + 1e-6)
    assert k >= _ref_k_lower_bound(ntk, eta, 5) * (1 - RTOL)
    assert k >= (1.0 - beta_t) * k_tr * (1 - RTOL)
    ab = _ref_ab_max(ntk, eta, 5)
    if abs(ab - 1.0) > 1e-3:
      assert (k < 1.0) == (ab < 1.0), (eta, k, ab)  # Theorem 2.1
    ks.append(k)
  assert np.all(np.diff(ks) > 0)  # K grows with η (entries of (I−A)^{-1/2}B(I−A)^{-1/2} do)
  assert ks[0] < 0.1 and ks[-1] > 1.0


def test_orderings_flat():
  """Paper (§2.3): K_tr ≤ K_HD ≤ K in high dimension. At N = 100 the β̃ terms reverse the second
  inequality in the flat setting (docs/design.md: K_HD 1.054 vs K 1.010 at η = 0.08), only slightly
  while ηλ_max is small; and at small η, K ≈ (1 − β̃) K_tr < K_tr."""
  j = _fig1_jacobian()
  ntk = j @ j.T / 100
  lam = np.linalg.eigvalsh(ntk)
  for eta in [0.02, 0.04, 0.06, 0.07, 0.08, 0.09, 0.1]:
    k = _k(ntk, eta, 5)
    k_hd = float(kstep.k_high_dim(eta, 5, lam))
    assert k < k_hd < 1.08 * k
  k_hd = float(kstep.k_high_dim(0.08, 5, lam))
  np.testing.assert_allclose([_k(ntk, 0.08, 5), k_hd], [1.010, 1.054], atol=2e-3)
  assert _k(ntk, 0.02, 5) < float(kstep.k_from_trace(0.02, 5, lam.sum()))


def test_orderings_dispersed():
  """Dispersed spectrum: K_tr ≤ K_HD ≤ K as the paper says (A.4), except as η λ_max → 2, where
  K_HD blows up and the finite-N K does not (1 − A stays ≥ η λ (2 − r η λ) > 0)."""
  ntk = _ntk("dispersed")
  lam = np.linalg.eigvalsh(ntk)
  for frac in [0.01, 0.1, 0.3, 0.5, 0.7, 0.8]:
    eta = frac * 2.0 / lam.max()
    k = _k(ntk, eta, 5)
    k_hd = float(kstep.k_high_dim(eta, 5, lam))
    k_tr = float(kstep.k_from_trace(eta, 5, lam.sum()))
    assert k_tr <= k_hd <= k, (frac, k_tr, k_hd, k)
  eta = 0.975 * 2.0 / lam.max()
  assert float(kstep.k_high_dim(eta, 5, lam)) > 2.0 * _k(ntk, eta, 5)


# ----------------------------------------------------------------------------------------------
# The second-moment operator.


def test_eq26_is_the_sgd_second_moment():
  """Enumerating every batch of a tiny problem: the mean of z zᵀ after one step of
  z ← z − (η/B) J J_Bᵀ z_B is eq. 26 with Θ̂ = J Jᵀ/N, and kstep's operator matches."""
  rng = np.random.default_rng(3)
  n, p, b, eta = 6, 4, 2, 0.3
  j = rng.standard_normal((n, p))
  ntk = j @ j.T / n
  z = rng.standard_normal(n)
  mean1 = np.zeros(n)
  mean2 = np.zeros((n, n))
  batches = list(itertools.combinations(range(n), b))
  for batch in batches:
    batch = list(batch)
    z1 = z - eta / b * j @ (j[batch].T @ z[batch])
    mean1 += z1 / len(batches)
    mean2 += np.outer(z1, z1) / len(batches)
  np.testing.assert_allclose(mean1, z - eta * ntk @ z, rtol=1e-10)  # eq. 6
  s = np.outer(z, z)
  np.testing.assert_allclose(mean2, _ref_apply_t(ntk, eta, b, s), rtol=1e-10)
  got = noise_kernel.second_moment_operator(ntk, eta, b)(jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), mean2, rtol=1e-4, atol=1e-5 * np.abs(mean2).max())


@pytest.mark.parametrize("name", list(SETTINGS))
def test_second_moment_growth_dense(name):
  n, b = 12, 3
  ntk = _ntk(name, n=n, seed=2)
  lam_max = np.linalg.eigvalsh(ntk).max()
  for frac in [0.01, 0.1, 0.3, 0.45, 0.55, 0.7, 0.95]:
    eta = frac * 2.0 / lam_max
    want = _ref_growth(ntk, eta, b)
    got = _g(ntk, eta, b)
    np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{name} eta={eta}")
    k = _k(ntk, eta, b)
    assert _ref_ab_max(ntk, eta, b) <= got * (1 + RTOL)  # λ_max(A + B) ≤ ρ(T)
    if k >= 1.0:
      assert got > 1.0


def test_localized_k_misses_the_edge():
  """Appendix A.4 / Figure 7 (right): with localized eigenvectors the second moment can diverge
  while K is well below 1 (in this small draw K ≈ 0.88, ρ(T) ≈ 1.06); the same η on the flat
  draw with the same K is stable."""
  n, b = 12, 3
  loc = _ntk("localized", n=n, seed=2)
  eta = 0.46 * 2.0 / np.linalg.eigvalsh(loc).max()
  assert _k(loc, eta, b) < 0.9
  assert _ref_growth(loc, eta, b) > 1.03 and _g(loc, eta, b) > 1.03
  flat = _ntk("flat", n=n, seed=2)
  eta = 0.46 * 2.0 / np.linalg.eigvalsh(flat).max()
  assert _k(flat, eta, b) < 0.9 and _g(flat, eta, b) < 1.0


def test_second_moment_growth_accuracy_near_the_edge():
  """Figure 1 NTK, N = 100, close to the S-EOS where the top two eigenvalues of T nearly cross.
  Reference: ρ(T) from the dense restriction is too big here (5050²); use λ_max(A + B) ≤ ρ(T),
  which is tight when the top eigenvector is diagonal in the eigenbasis (the stable side: the
  slowest mode), and the power iteration's Rayleigh quotient never overshoots."""
  j = _fig1_jacobian()
  ntk = j @ j.T / 100
  lam_min = np.linalg.eigvalsh(ntk).min()
  for eta in [0.06, 0.075]:
    g = _g(ntk, eta, 5)
    ab = _ref_ab_max(ntk, eta, 5)
    # The slowest deterministic mode (1 − ηλ_min)² plus its noise, to ~1e-4; a plain power
    # iteration with a "stopped changing" test returned 0.99674 here instead of 0.99791.
    assert ab <= g * (1 + 1e-6) and g <= ab + 2e-4, (eta, g, ab)
    assert g >= (1 - eta * lam_min) ** 2 - 1e-4
    assert g < 1.0


# ----------------------------------------------------------------------------------------------
# Figure 1: linear regression, J i.i.d. N(0, 1) of shape 100×120, B = 5, 10⁴ SGD steps.

STABLE_ETAS = [0.02, 0.04, 0.06, 0.065]  # K ≤ 0.9
UNSTABLE_ETAS = [0.09, 0.1, 0.12, 0.15, 0.2]  # K ≥ 1.1, η λ_max ≤ 0.9
EDGE_ETAS = [0.07, 0.077, 0.078, 0.08]  # docs/design.md's 0.07 / 0.08, and where ρ(T) crosses 1


def _simulate_sgd(j, etas, b, steps, seeds, momentum=0.0):
  """SGD on z = Jθ − y (θ₀ = 0, y ~ N(0, I)), batches of B drawn without replacement each step:
  θ ← θ − (η/B) J_Bᵀ z_B, written on the residual as z ← z − (η/B) z_B J_B Jᵀ (eq. 4–5). With
  ``momentum`` μ, heavy ball in optax's convention (v ← g + μ v, θ ← θ − η v, eq. 53–54), on the
  residual with w = J v: w ← (1/B) J J_Bᵀ z_B + μ w, z ← z − η w.
  Returns final loss / initial loss, shape (len(seeds), len(etas)); inf/nan where it blew up."""
  n = j.shape[0]
  gram = j @ j.T
  etas = np.asarray(etas, np.float64)
  rngs = [np.random.default_rng(seed) for seed in seeds]
  y = np.stack([rng.standard_normal(n) for rng in rngs])
  idx = np.stack([np.argsort(rng.random((steps, n)), axis=1)[:, :b] for rng in rngs], axis=1)
  z = np.broadcast_to(-y[:, None, :], (len(seeds), etas.size, n)).copy()
  loss0 = np.mean(z**2, axis=-1)
  step = (etas / b)[None, :, None]
  w = np.zeros_like(z)
  with np.errstate(over="ignore", invalid="ignore"):
    for t in range(steps):
      batch = idx[t]  # (seeds, B)
      zb = np.take_along_axis(z, batch[:, None, :], axis=2)  # (seeds, etas, B)
      w = zb @ gram[batch] + momentum * w  # gram[batch]: (seeds, B, N)
      z -= step * w
    return np.mean(z**2, axis=-1) / loss0


@pytest.fixture(scope="module")
def fig1():
  j = _fig1_jacobian()
  etas = STABLE_ETAS + EDGE_ETAS + UNSTABLE_ETAS
  ratio = _simulate_sgd(j, etas, 5, 10_000, seeds=range(3))
  ntk = j @ j.T / 100
  k = {eta: _k(ntk, eta, 5) for eta in etas}
  growth = {eta: _g(ntk, eta, 5) for eta in etas}
  return j, ntk, dict(zip(etas, ratio.T)), k, growth


def _converged(ratio):
  return bool(np.all(np.isfinite(ratio)) and np.all(ratio < 1e-2))


def _diverged(ratio):
  return bool(np.all(~np.isfinite(ratio) | (ratio > 1e3)))


def test_sgd_residual_update_is_the_parameter_update():
  rng = np.random.default_rng(5)
  j = rng.standard_normal((100, 120))
  y = rng.standard_normal(100)
  theta, z = np.zeros(120), -y
  for _ in range(50):
    batch = rng.choice(100, 5, replace=False)
    theta = theta - 0.07 / 5 * j[batch].T @ (j[batch] @ theta - y[batch])
    z = z - 0.07 / 5 * z[batch] @ j[batch] @ j.T
  np.testing.assert_allclose(z, j @ theta - y, rtol=1e-9, atol=1e-9)


def test_fig1_k_crosses_one(fig1):
  _, ntk, _, k, _ = fig1
  lam_max = np.linalg.eigvalsh(ntk).max()
  np.testing.assert_allclose(2.0 / lam_max, 0.45, atol=0.01)
  np.testing.assert_allclose([k[0.07], k[0.08]], [0.874, 1.0095], atol=1e-3)
  assert k[0.07] < 1.0 < k[0.08]
  for eta in STABLE_ETAS + EDGE_ETAS + UNSTABLE_ETAS:
    np.testing.assert_allclose(k[eta], _ref_k_exact(ntk, eta, 5), rtol=RTOL)


def test_fig1_sweep(fig1):
  _, ntk, ratio, k, growth = fig1
  lam_max = np.linalg.eigvalsh(ntk).max()
  for eta in STABLE_ETAS:
    assert k[eta] <= 0.9
    assert _converged(ratio[eta]), (eta, k[eta], ratio[eta])
    assert growth[eta] < 1.0
  for eta in UNSTABLE_ETAS:
    assert k[eta] >= 1.1 and eta * lam_max < 1.0  # purely stochastic instability
    assert _diverged(ratio[eta]), (eta, k[eta], ratio[eta])
    assert growth[eta] > 1.0


def test_fig1_growth_is_the_edge(fig1):
  """ρ(T) > 1 exactly where SGD diverges, including the sharp edge between η = 0.077
  (ρ ≈ 0.9997, K ≈ 0.97) and η = 0.078 (ρ ≈ 1.0027, K ≈ 0.98), which K = 1 places a little late
  (λ_max(A + B) ≤ ρ(T)). Design doc: converges at 0.07, diverges at 0.08."""
  _, _, ratio, k, growth = fig1
  for eta, r in ratio.items():
    diverged = _diverged(r)
    assert diverged or _converged(r), (eta, r)
    assert diverged == (growth[eta] > 1.0), (eta, growth[eta], r)
  assert _converged(ratio[0.07]) and _diverged(ratio[0.08])
  assert growth[0.077] < 1.0 < growth[0.078]
  assert k[0.078] < 1.0


@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_fig1_momentum_edge_is_k_tr_one(momentum):
  """Eq. 18 with momentum: on the Figure 1 problem, heavy-ball SGD at the step that puts
  K_tr = η T / (2 (1 − μ) B) at 0.9 converges and at 1.2 diverges (3 seeds, 10⁴ steps), for
  μ = 0.5 and 0.9: the edge sits at K_tr ≈ 1 in the units the controller uses, not at 1/(1 − μ)
  times it (measured edge for μ = 0.9: between K_tr 1.0 and 1.1)."""
  j = _fig1_jacobian()
  trace = np.trace(j @ j.T / 100)
  ks = np.array([0.9, 1.2])
  etas = ks * 2 * (1 - momentum) * 5 / trace
  np.testing.assert_allclose(
      [float(noise_kernel.k_from_trace(e, 5, trace, momentum)) for e in etas], ks, rtol=1e-5
  )
  ratio = _simulate_sgd(j, etas, 5, 10_000, seeds=range(3), momentum=momentum)
  assert _converged(ratio[:, 0]), ratio[:, 0]
  assert _diverged(ratio[:, 1]), ratio[:, 1]


# ----------------------------------------------------------------------------------------------
# jit, rank deficiency.


@pytest.mark.slow
def test_jit():
  ntk = _ntk("flat", n=30)
  lam = np.linalg.eigvalsh(ntk)
  ntk32 = jnp.asarray(ntk, jnp.float32)
  eta, b = 0.4 * 2 / lam.max(), 3
  pairs = [
      (kstep.k_from_trace, (eta, b, lam.sum(), 0.9)),
      (kstep.k_high_dim, (eta, b, jnp.asarray(lam, jnp.float32))),
      (kstep.k_exact, (ntk32, eta, b)),
      (kstep.second_moment_growth, (ntk32, eta, b)),
  ]
  for fn, args in pairs:
    eager = float(fn(*args))
    jitted = jax.jit(fn)(*(jnp.asarray(a) for a in args))
    assert np.isfinite(eager)
    np.testing.assert_allclose(float(jitted), eager, rtol=1e-5, err_msg=fn.__name__)
  # Traced η and B inside a vmapped sweep.
  etas = jnp.linspace(0.01, 0.9, 5) * 2 / lam.max()
  swept = jax.jit(jax.vmap(kstep.k_exact, in_axes=(None, 0, None)))(ntk32, etas, b)
  want = [_ref_k_exact(ntk, float(e), b) for e in etas]
  np.testing.assert_allclose(np.asarray(swept), want, rtol=RTOL)


def test_rank_deficient_ntk():
  """J of shape 20×8: Θ̂ has 12 zero eigenvalues (float32 eigh returns them as ±1e-8)."""
  rng = np.random.default_rng(6)
  j = rng.standard_normal((20, 8))
  ntk = j @ j.T / 20
  lam = np.linalg.eigvalsh(ntk)
  lam_max = lam.max()
  for b in [2, 5]:
    for frac in [1e-6, 1e-3, 0.1, 0.3, 0.6, 0.9]:
      eta = frac * 2 / lam_max
      k = _k(ntk, eta, b)
      assert np.isfinite(k)
      np.testing.assert_allclose(k, _ref_k_exact(ntk, eta, b), rtol=RTOL)  # zero modes dropped
      k_hd = float(kstep.k_high_dim(eta, b, lam.astype(np.float32)))
      np.testing.assert_allclose(k_hd, _ref_k_hd(eta, b, np.clip(lam, 0, None)), rtol=RTOL)
      g = _g(ntk, eta, b)
      assert np.isfinite(g)
      # The null-space part of z never moves: ρ(T) = max(1, ρ on the range).
      want = _ref_growth(ntk, eta, b)
      np.testing.assert_allclose(g, want, rtol=RTOL)
      assert g >= 1.0 - 1e-5
      if k >= 1.0:
        assert g > 1.0


# ----------------------------------------------------------------------------------------------
# Longer variants (pytest -m slow).


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("b", [2, 4])
def test_second_moment_growth_dense_n16(name, b):
  ntk = _ntk(name, n=16, seed=7)
  lam_max = np.linalg.eigvalsh(ntk).max()
  for frac in np.linspace(0.02, 0.98, 13):
    eta = frac * 2.0 / lam_max
    want = _ref_growth(ntk, eta, b)
    got = _g(ntk, eta, b)
    np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{name} eta={eta}")
    assert _ref_ab_max(ntk, eta, b) <= got * (1 + RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("draw", [10, 11, 12])
def test_sgd_sweep_other_draws(draw):
  """Figure 1's experiment on other draws of J (100×120), five batch/target seeds each."""
  j = np.random.default_rng(draw).standard_normal((100, 120))
  ntk = j @ j.T / 100
  etas = [0.02, 0.04, 0.055, 0.065, 0.095, 0.11, 0.13, 0.17]
  ratio = _simulate_sgd(j, etas, 5, 10_000, seeds=range(100, 105))
  for eta, r in zip(etas, ratio.T):
    k, g = _k(ntk, eta, 5), _g(ntk, eta, 5)
    if k <= 0.9:
      assert _converged(r) and g < 1.0, (eta, k, g, r)
    if k >= 1.1:
      assert _diverged(r) and g > 1.0, (eta, k, g, r)
    if abs(g - 1.0) > 1e-3:
      assert _diverged(r) == (g > 1.0), (eta, k, g, r)


@pytest.mark.slow
def test_dispersed_growth_n100():
  ntk = _ntk("dispersed")
  lam_max = np.linalg.eigvalsh(ntk).max()
  for frac in [0.3, 0.6, 0.7, 0.8, 0.9]:
    eta = frac * 2.0 / lam_max
    g, k, ab = _g(ntk, eta, 5), _k(ntk, eta, 5), _ref_ab_max(ntk, eta, 5)
    assert ab <= g * (1 + 1e-5) and np.isfinite(g)
    if k >= 1.0:
      assert g > 1.0
