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
"""

from __future__ import annotations

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


def k_matrices(ntk: Array, learning_rate: Any, batch_size: Any) -> tuple[Array, Array]:
  """The diagonal of A and the matrix B of Theorem 2.1 / eq. 8 (with eq. 32's η² on the β̃ term).

  ``A = (I − ηΛ)² + (β̃/β − 1) η² Λ²``, ``B = ((1 − β̃)/β) η² Λ C Λ``,
  ``C_bm = Σ_a V_ab² V_am²``. Modes with λ ≤ 1e-6·λ_max are dropped: they carry no noise
  (their rows of B vanish) and leave ``I − A`` singular.
  """
  ntk = _f32(ntk)
  n = ntk.shape[0]
  beta, beta_t = _batch_fractions(n, batch_size)
  eta = _f32(learning_rate)
  lam, v = jnp.linalg.eigh((ntk + ntk.T) / 2)
  keep = lam > 1e-6 * jnp.max(jnp.abs(lam))
  lam = jnp.where(keep, lam, 0.0)
  a = (1.0 - eta * lam) ** 2 + (beta_t / beta - 1.0) * eta**2 * lam**2
  v2 = v**2
  c = v2.T @ v2
  bmat = (1.0 - beta_t) / beta * eta**2 * lam[:, None] * c * lam[None, :]
  return jnp.where(keep, a, 0.0), bmat


def k_exact(ntk: Array, learning_rate: Any, batch_size: Any) -> Array:
  """Noise kernel norm of Theorem 2.1: ``K = λ_max[(I − A)^{-1/2} B (I − A)^{-1/2}]``.

  For scalar-output MSE on N examples with empirical NTK ``ntk`` (N×N, small N). Returns
  ``inf`` when ``‖A‖ ≥ 1`` (the first-moment/deterministic dynamics are already unstable).
  """
  a, bmat = k_matrices(ntk, learning_rate, batch_size)
  stable = jnp.max(jnp.abs(a)) < 1.0
  d = jax.lax.rsqrt(jnp.where(stable, 1.0 - a, 1.0))
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
    ntk: Array, learning_rate: Any, batch_size: Any, *, max_iters: int = 20000, tol: float = 1e-7
) -> Array:
  """Largest |eigenvalue| of the second-moment operator T (eq. 26/30): the exact S-EOS test.

  Matrix-free power iteration on N×N matrices (T preserves the PSD cone, so its spectral radius
  is an eigenvalue with a PSD eigenvector and iterating from the identity converges to it).
  Above 1, ``E[z_t z_tᵀ]`` diverges; below 1 it converges to 0. Stops when the growth factor
  changes by less than ``tol`` (relative) or after ``max_iters`` applications.
  """
  apply = second_moment_operator(ntk, learning_rate, batch_size)
  n = _f32(ntk).shape[0]

  def cond(state):
    k, _, rho, rho_prev = state
    return jnp.logical_and(k < max_iters, jnp.abs(rho - rho_prev) > tol * jnp.abs(rho))

  def body(state):
    k, s, rho, _ = state
    t = apply(s)
    t = (t + t.T) / 2  # covariances are symmetric; keep rounding from growing an antisymmetric part
    norm = jnp.linalg.norm(t)
    return k + 1, t / jnp.where(norm > 0, norm, 1.0), norm, rho

  s0 = jnp.eye(n, dtype=jnp.float32) / jnp.sqrt(jnp.float32(n))
  _, _, rho, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), s0, jnp.float32(1.0), jnp.inf))
  return rho
