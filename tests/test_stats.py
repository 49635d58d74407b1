"""kstep.stats on states that wrap their leaves: flax NNX's ``nnx.Optimizer``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import kstep

X = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).standard_normal((8, 2)), jnp.float32)


def test_stats_of_an_nnx_optimizer_are_plain_arrays():
  """``nnx.Optimizer(...).opt_state`` holds every leaf in an ``OptArray``; ``kstep.stats`` hands
  back the arrays (an f-string of an OptArray raised), with the value of the plain optax run."""
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(model)

  def loss_of_params(params, batch):
    outputs = nnx.merge(graphdef, params)(batch["x"])
    return 0.5 * jnp.mean(jnp.sum((outputs - batch["y"]) ** 2, axis=-1))

  def loss_of_model(model, batch):
    return loss_of_params(nnx.state(model), batch)

  tx = optax.chain(optax.sgd(0.1),
                   kstep.track_lambda_max(loss_of_params, every=1, num_iters=8, tol=1e-6,
                                          learning_rate=0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batch = {"x": X, "y": Y}

  @nnx.jit
  def train_step(model, optimizer, batch):
    grads = nnx.grad(loss_of_model)(model, batch)
    optimizer.update(model, grads, batch=batch)

  before = kstep.stats(optimizer.opt_state)
  assert all(isinstance(v, jax.Array) for v in before.values()), before
  assert np.isnan(before["lambda_max"])
  train_step(model, optimizer, batch)
  s = kstep.stats(optimizer.opt_state)
  assert set(s) == set(kstep.TrackLambdaMaxState.STATS_FIELDS)
  assert all(isinstance(v, jax.Array) and v.shape == () for v in s.values()), s
  assert f"{s['lambda_max']:.3f}" and f"{s['lambda_max_num_measurements']:d}"  # formats
  # The Hessian of ½‖[X 1] W − Y‖² / B in W is ([X 1]ᵀ[X 1] / B) ⊗ I: its top eigenvalue.
  xb = np.concatenate([np.asarray(X, np.float64), np.ones((8, 1))], axis=1)
  top = np.linalg.eigvalsh(xb.T @ xb / 8)[-1]
  np.testing.assert_allclose(s["lambda_max"], top, rtol=1e-4)
  np.testing.assert_allclose(s["lambda_max_edge_ratio"], 0.1 * top / 2, rtol=1e-4)
  assert int(s["lambda_max_num_measurements"]) == 1
  # The eigenvector inside the NNX state is wrapped too; its values are a unit vector.
  vec = [v for v in jax.tree.leaves(optimizer.opt_state[1].eigenvector)]
  np.testing.assert_allclose(np.linalg.norm(ravel_pytree(vec)[0]), 1.0, rtol=1e-5)
