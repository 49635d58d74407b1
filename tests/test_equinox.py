"""kstep with an equinox model: ``eqx.partition`` / ``eqx.combine`` in ``apply_fn``.

The reference is a dense Jacobian of the same model (``jax.jacrev``): the K the controller
reports is η/(2αB)·T/C with T the per-example NTK trace of the equinox MLP.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep

eqx = pytest.importorskip("equinox")

B, D, C = 8, 4, 3


def test_equinox_recipe_trains_and_reports_the_dense_k():
  model = eqx.nn.MLP(D, C, width_size=16, depth=2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)  # arrays; the rest is static

  def apply_fn(p, batch):
    return jax.vmap(eqx.combine(p, static))(batch["x"])

  def loss_fn(p, batch):
    return 0.5 * jnp.mean(jnp.sum(jnp.square(apply_fn(p, batch) - batch["y"]), axis=-1))

  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(B, C)), jnp.float32)}
  batches = [batch] * 5  # one batch: the loss must fall
  opt = kstep.k_controlled_sgd(
      10.0, apply_fn=apply_fn, guard=None,
      estimate=kstep.Estimate(every=1, estimator="exact", smoothing=0.0))

  @jax.jit
  def step(p, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, state = opt.update(grads, state, p, batch=batch)
    return optax.apply_updates(p, updates), state, loss

  state = opt.init(params)
  losses = []
  for batch in batches:
    before = params
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  # The last estimate ran on the last batch at the params before the last update; smoothing 0
  # makes S̄ that estimate alone. Dense reference: Σ_i ‖J_i‖²_F / B over the flattened params.
  flat, unravel = jax.flatten_util.ravel_pytree(before)
  jac = jax.jacrev(lambda v: apply_fn(unravel(v), batches[-1]))(flat)  # (B, C, P)
  trace = float(jnp.sum(jac**2)) / B
  s = kstep.stats(state)
  eta = float(s["k_learning_rate"])
  np.testing.assert_allclose(float(s["k_trace"]), trace, rtol=1e-4)
  np.testing.assert_allclose(float(s["k"]), eta / (2 * (1 - 0.9) * B) * trace / C, rtol=1e-4)
  assert float(s["k"]) <= 0.4 + 1e-5 and eta < 10.0  # the band's top lowered base LR 10
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
