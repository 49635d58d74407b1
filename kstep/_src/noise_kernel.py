"""The noise kernel norm K of Agarwala & Pennington (2024) and the exact second-moment test.

Notation (K paper, §2): N examples, batch size B, step η, batch fraction β = B/N,
β̃ = (B − 1)/(N − 1), empirical NTK Θ̂ = J Jᵀ / N = V Λ Vᵀ, momentum μ = 1 − α in optax's
convention (``optax.sgd(η, momentum=μ)``). K < 1 is the stochastic edge of stability (S-EOS).

* :func:`k_from_trace`: ``K_tr = η / (2 α B) · T`` (eq. 11; momentum eq. 18; any loss with the
  Gauss–Newton trace T, eq. 87/130). Eq. 52 prints η/B: a typo (eq. 10 → 11 gives the ½).
* :func:`k_high_dim`: ``K_HD = (η/B) Σ_a λ_a / (2 − η λ_a)`` (eq. 10).
* :func:`k_exact`: Theorem 2.1, ``K = λ_max[(I − A)^{-1} B]`` with the β̃ terms of eq. 32.
* :func:`second_moment_growth`: the spectral radius of the full second-moment operator (eq. 26/30);
  above 1 the expected loss of SGD on the linearised model grows without bound.

Equation numbers are the K paper's: Agarwala & Pennington, `High dimensional analysis reveals
conservative sharpening and a stochastic edge of stability <https://arxiv.org/abs/2404.19261>`_,
2024. ``docs/design.md`` derives them in kstep's notation.
"""

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x: Any) -> Array:
  return jnp.asarray(x, jnp.float32)


def k_from_trace(learning_rate: Any, batch_size: Any, trace: Any, momentum: Any = 0.0) -> Array:
  """Trace estimator of the noise kernel norm: ``K = η / (2 (1 − μ) B) · T`` (eq. 11/18/87).

  Args:
    learning_rate: the step η actually taken.
    batch_size: B, examples per batch.
    trace: T, the per-example mean NTK trace (MSE) or Gauss–Newton trace (other losses), as
      returned by :func:`kstep.gauss_newton_trace`.
    momentum: μ (heavy-ball, optax convention), α = 1 − μ.
  """
  return _f32(learning_rate) * _f32(trace) / (2.0 * (1.0 - _f32(momentum)) * _f32(batch_size))


def k_high_dim(learning_rate: Any, batch_size: Any, eigenvalues: Any) -> Array:
  """High-dimensional estimator ``K_HD = (η/B) Σ_a λ_a / (2 − η λ_a)`` (eq. 10).

  ``eigenvalues`` are those of Θ̂ = J Jᵀ / N. Returns ``inf`` when some ``η λ_a ≥ 2`` (past the
  deterministic edge of stability, where the formula no longer applies).
  """
  eta = _f32(learning_rate)
  lam = _f32(eigenvalues)
  denom = 2.0 - eta * lam
  terms = lam / jnp.where(denom > 0, denom, 1.0)
  value = eta / _f32(batch_size) * jnp.sum(terms)
  return jnp.where(jnp.all(denom > 0), value, jnp.inf)


def _batch_fractions(n: int, batch_size: Any) -> tuple[Array, Array]:
  b = _f32(batch_size)
  return b / n, (b - 1.0) / (n - 1.0)


def _k_terms(ntk: Array, learning_rate: Any, batch_size: Any):
  """Kept-mode mask, ``1 − A``, ``1 + A`` and ``B`` of Theorem 2.1 (see :func:`k_matrices`).

  ``1 − A`` is computed as ``ηλ (2 − (β̃/β) ηλ)`` rather than by subtracting ``A`` from 1: in
  float32 ``(1 − ηλ)²`` rounds to exactly 1 once ``ηλ ≲ 6e-8`` (small η, or a small eigenvalue),
  which would make a perfectly stable mode look marginal (``‖A‖ = 1``, K = inf).
  """
  ntk = _f32(ntk)
  n = ntk.shape[0]
  beta, beta_t = _batch_fractions(n, batch_size)
  eta = _f32(learning_rate)
  lam, v = jnp.linalg.eigh((ntk + ntk.T) / 2)
  keep = lam > 1e-6 * jnp.max(jnp.abs(lam))
  lam = jnp.where(keep, lam, 0.0)
  x = eta * lam
  one_minus_a = x * (2.0 - beta_t / beta * x)
  one_plus_a = 2.0 - 2.0 * x + beta_t / beta * x**2
  v2 = v**2
  c = v2.T @ v2
  bmat = (1.0 - beta_t) / beta * eta**2 * lam[:, None] * c * lam[None, :]
  return keep, one_minus_a, one_plus_a, bmat


def k_matrices(ntk: Array, learning_rate: Any, batch_size: Any) -> tuple[Array, Array]:
  """The diagonal of A and the matrix B of Theorem 2.1 / eq. 8 (with eq. 32's η² on the β̃ term).

  ``A = (I − ηΛ)² + (β̃/β − 1) η² Λ²``, ``B = ((1 − β̃)/β) η² Λ C Λ``,
  ``C_bm = Σ_a V_ab² V_am²``. Modes with λ ≤ 1e-6·λ_max are dropped: they carry no noise
  (their rows of B vanish) and leave ``I − A`` singular.
  """
  keep, one_minus_a, _, bmat = _k_terms(ntk, learning_rate, batch_size)
  return jnp.where(keep, 1.0 - one_minus_a, 0.0), bmat


def k_exact(ntk: Array, learning_rate: Any, batch_size: Any) -> Array:
  """Noise kernel norm of Theorem 2.1: ``K = λ_max[(I − A)^{-1/2} B (I − A)^{-1/2}]``.

  For scalar-output MSE on N examples with empirical NTK ``ntk`` (N×N, small N). Returns
  ``inf`` when ``‖A‖ ≥ 1`` (the first-moment/deterministic dynamics are already unstable).
  """
  keep, one_minus_a, one_plus_a, bmat = _k_terms(ntk, learning_rate, batch_size)
  one_minus_a = jnp.where(keep, one_minus_a, 1.0)
  one_plus_a = jnp.where(keep, one_plus_a, 1.0)
  stable = jnp.logical_and(jnp.all(one_minus_a > 0), jnp.all(one_plus_a > 0))  # ‖A‖ < 1
  d = jax.lax.rsqrt(jnp.where(stable, one_minus_a, 1.0))
  m = d[:, None] * bmat * d[None, :]
  value = jnp.linalg.eigvalsh((m + m.T) / 2)[-1]
  return jnp.where(stable, jnp.maximum(value, 0.0), jnp.inf)


def second_moment_operator(ntk: Array, learning_rate: Any, batch_size: Any):
  """The linear map T of eq. 26 on N×N matrices S (the covariance of the residuals):

  ``T(S) = S − η(Θ̂S + SΘ̂) + (β̃/β) η² Θ̂SΘ̂ + ((1 − β̃)/β) η² Θ̂ diag(S) Θ̂``.
  """
  ntk = _f32(ntk)
  n = ntk.shape[0]
  beta, beta_t = _batch_fractions(n, batch_size)
  eta = _f32(learning_rate)

  def apply(s: Array) -> Array:
    ts = ntk @ s
    return (
        s - eta * (ts + s @ ntk) + beta_t / beta * eta**2 * ts @ ntk
        + (1.0 - beta_t) / beta * eta**2 * (ntk * jnp.diag(s)[None, :]) @ ntk
    )

  return apply


def second_moment_growth(
    ntk: Array, learning_rate: Any, batch_size: Any, *, max_iters: int = 20000, tol: float = 1e-5
) -> Array:
  """Largest |eigenvalue| of the second-moment operator T (eq. 26/30): the exact S-EOS test.

  Above 1, ``E[z_t z_tᵀ]`` diverges; below 1 it converges to 0 (exactly 1 when Θ̂ is singular:
  the residual's component in its null space never moves).

  Matrix-free power iteration on N×N matrices, in the form of eq. 30 conjugated by Λ^{1/2}:
  with ``W = V Λ^{1/2}`` and ``d_μν = 1 − η(λ_μ + λ_ν) + (β̃/β) η² λ_μ λ_ν``,
  ``T'(X) = d ∘ X + ((1 − β̃)/β) η² Wᵀ diag(W X Wᵀ) W``. T' has the spectrum of T (for singular
  Θ̂ both are block-triangular with the same diagonal blocks) but is symmetric, and it preserves
  the PSD cone, so the spectral radius is its top eigenvalue with a PSD eigenvector. Restricted to
  diagonal matrices T' is ``A + B`` of eq. 33 (so ``λ_max(A + B) ≤`` the result: K ≥ 1 implies
  growth ≥ 1); the iteration starts from its top eigenvector as a diagonal matrix, plus some of
  the identity (which overlaps every PSD eigenvector). The noise term of T' is PSD, so no
  eigenvalue lies below min d: the iteration applies ``T' − max(min d, 0)``, which has the same
  top eigenvector and a better ratio to the next one. The estimate is the Rayleigh quotient of
  T', which never exceeds the spectral radius (up to rounding) and whose error is quadratic in
  the eigenvector's. (T itself is far from normal: the norm ratio ‖T(S)‖/‖S‖ of a plain iteration
  can stop 1e-3 away from the answer when the top two eigenvalues are close, as they are at the
  S-EOS.) Stops when the relative residual ``‖T'X − ρX‖ / ρ`` (with ``‖X‖ = 1``) falls below
  ``tol`` or after ``max_iters`` applications.
  """
  ntk = _f32(ntk)
  n = ntk.shape[0]
  beta, beta_t = _batch_fractions(n, batch_size)
  eta = _f32(learning_rate)
  lam, v = jnp.linalg.eigh((ntk + ntk.T) / 2)
  lam = jnp.maximum(lam, 0.0)
  x = eta * lam
  d = 1.0 - (x[:, None] + x[None, :]) + beta_t / beta * x[:, None] * x[None, :]
  noise = (1.0 - beta_t) / beta * eta**2
  w = v * jnp.sqrt(lam)[None, :]
  shift = jnp.maximum(jnp.min(d), 0.0)

  def apply(m: Array) -> Array:
    q = jnp.sum((w @ m) * w, axis=1)  # diag(W X Wᵀ)
    t = d * m + noise * (w.T * q[None, :]) @ w
    return (t + t.T) / 2  # keep rounding from growing an antisymmetric part

  def cond(state):
    k, _, _, res = state
    return jnp.logical_and(k < max_iters, res > tol)

  def body(state):
    k, m, _, _ = state
    t = apply(m)
    rho = jnp.sum(m * t)
    res = jnp.linalg.norm(t - rho * m) / jnp.maximum(jnp.abs(rho), jnp.finfo(jnp.float32).tiny)
    u = t - shift * m
    norm = jnp.linalg.norm(u)  # 0 only if m is an eigenvector (res = 0: the loop stops)
    return k + 1, u / jnp.where(norm > 0, norm, 1.0), rho, res

  # Start from the top eigenvector p̃ of A + B (eq. 33: T' compressed to diagonal matrices,
  # symmetric in these coordinates), plus some identity so that no PSD eigenvector is orthogonal.
  v2 = v**2
  ab = jnp.diag(jnp.diagonal(d)) + noise * lam[:, None] * (v2.T @ v2) * lam[None, :]
  p = jnp.abs(jnp.linalg.eigh(ab)[1][:, -1])
  x0 = jnp.diag(p / jnp.linalg.norm(p) + 0.1 / jnp.sqrt(jnp.float32(n)))
  x0 = x0 / jnp.linalg.norm(x0)
  init = (jnp.int32(0), x0, jnp.float32(0.0), jnp.float32(jnp.inf))
  _, _, rho, _ = jax.lax.while_loop(cond, body, init)
  return jnp.abs(rho)


def curvature_edge(momentum: Any, nesterov: bool = False, ema: bool = False) -> Array:
  """E(μ), the largest stable ``η·λ`` of momentum SGD on a quadratic.

  .. math::
    E(μ) = 2(1 + μ) \\text{ (heavy ball)}, \\qquad E(μ) = \\frac{2(1 + μ)}{1 + 2μ}
    \\text{ (Nesterov, optax's form)}, \\qquad E(μ) = \\frac{2(1 + μ)}{1 - μ} \\text{ (EMA)}

  The EMA form is Adam's (``m ← μ m + (1 − μ) g``, μ = β₁) in its preconditioned curvature
  ``λ_max(P⁻¹G)``: 38 at β₁ = 0.9 (``docs/design.md``, "Adaptive optimizers").

  Args:
    momentum: μ in [0, 1) (a float or a scalar array).
    nesterov: whether the momentum is Nesterov's (heavy-ball form only).
    ema: whether the momentum is an EMA of gradients (Adam's β₁).

  Returns:
    E(μ) as a float32 scalar (2 for plain SGD).

  Example:
    >>> import kstep
    >>> round(float(kstep.curvature_edge(0.9)), 4)
    3.8

  References:
    Cohen et al., `Gradient descent on neural networks typically occurs at the edge of
    stability <https://arxiv.org/abs/2103.00065>`_, 2021; ``docs/design.md``, "Two edges".
  """
  mu = jnp.asarray(momentum, jnp.float32)
  if ema:
    if nesterov:
      raise ValueError("`curvature_edge`: `nesterov` and `ema` exclude each other.")
    return 2.0 * (1.0 + mu) / (1.0 - mu)
  return 2.0 * (1.0 + mu) / (1.0 + 2.0 * mu) if nesterov else 2.0 * (1.0 + mu)
