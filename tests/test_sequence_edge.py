"""benchmarks.sequence_edge: the bisection, the divergence rule and the two K conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import sequence_edge as se


def test_divergence_rule():
  assert se.diverges(np.array([5.0, np.nan]))
  assert se.diverges(np.r_[np.full(10, 5.0), np.full(20, 6.0)])
  assert not se.diverges(np.r_[np.full(10, 5.0), np.full(20, 4.0)])


@pytest.mark.slow
def test_edge_brackets_a_divergent_and_a_stable_step_and_k_conventions_differ_by_t():
  data = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 120, np.uint8)
  model = se.TinyLM()
  measure, train = se.make_fns(model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  b, t = 2, 8
  xs = jnp.asarray(se.batches(data, b, t, se.STEPS, 0))
  eta, stable = se.edge_step(train, params, xs, iters=6)
  assert stable is not None
  # The bisection's last bracket: stable two bisection widths below, divergent far above.
  assert not se.diverges(np.asarray(train(params, xs, jnp.float32(eta / 2))[0]))
  assert se.diverges(np.asarray(train(params, xs, jnp.float32(eta * 30))[0]))
  s_tok, lam = se.curvature(measure, params, data, b, t, 0)
  assert s_tok > 0 and lam > 0
  row = {"seed": 0, "B": b, "T": t, "eta_star": eta, "S_tok": s_tok,
         "K_tok": eta * s_tok / (2 * b * t), "K_seq": eta * s_tok / (2 * b),
         "curvature_ratio": eta * lam / 2}
  assert row["K_seq"] == pytest.approx(t * row["K_tok"])
  assert "| 2 | 8 |" in se.summary([row])


@pytest.mark.slow
def test_noise_ratio_is_one_for_independent_tokens():
  """On i.i.d. random bytes every token's residual is independent of the text before it, so a
  sequence of T tokens carries the noise of T independent ones: ρ = 1 within its error."""
  from benchmarks import sequence_noise as sn

  data = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint8)
  model = se.TinyLM()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  quad_forms = sn.make_ratio(model)
  for t in (1, 8):
    r = sn.ratios(quad_forms, params, data, t, 0)
    for name in ("rho_I", "rho_G"):
      assert 0 < r[name + "_se"] < 0.2
      assert abs(r[name] - 1) < 4 * r[name + "_se"] + 0.05, (t, name, r)
  assert "| init | 8 | 1.00 ± 0.02 |" in sn.summary(
      [{"point": "init", "T": 8, "rho_I": 1.0, "rho_I_se": 0.02, "rho_G": 1.1, "rho_G_se": 0.03}])
