"""benchmarks/batchnorm_edge.py: its pieces on a tiny BatchNorm CNN.

The candidate ``apply_fn``\\ s give the outputs they claim, their Gauss–Newton traces match
dense-Jacobian references, and the edge search brackets a known edge; slow: the train-mode
``apply_fn`` that docs/batchnorm.md recommends runs inside a jitted ``k_controlled_sgd`` step,
and the ``--quick`` command writes its JSON and summary.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo root

nn = pytest.importorskip("flax.linen")
pytest.importorskip("sklearn")

import kstep  # noqa: E402
from benchmarks import batchnorm_edge as be  # noqa: E402

B, C = 6, 3


def _tiny():
  model = be.BNCNN(widths=(2, 3), num_classes=C)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, 4, 4, 1)) * 2.0 + 0.5

  @jax.jit
  def init(x):
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    # Move off the initial running statistics (0, 1), so that eval and train mode differ.
    _, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return variables["params"], new["batch_stats"]

  params, running = init(x)
  return model, x, params, running


def _dense_trace(f, params) -> jax.Array:
  """‖J‖²_F / B with J the Jacobian of all B·C outputs: the MSE Gauss–Newton trace."""
  jac = jax.jacrev(lambda p: f(p).reshape(-1))(params)
  return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(jac)) / B


def test_conv3x3_is_a_same_padded_convolution():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5, 3))
  ours = be.Conv3x3(4)

  @jax.jit
  def both(x):
    p = ours.init(jax.random.PRNGKey(3), x)
    kernel = p["params"]["Dense_0"]["kernel"].reshape(3, 3, 3, 4)
    conv = nn.Conv(4, (3, 3), padding=1, use_bias=False)
    return ours.apply(p, x), conv.apply({"params": {"kernel": kernel}}, x)

  np.testing.assert_allclose(*both(x), atol=1e-5)


def test_candidates_outputs_and_traces_match_dense_references():
  """c gives train mode's outputs, a other ones; c's exact trace (a per-example function) and
  b's Hutchinson trace on the batch function match ‖J‖²_F / B of dense Jacobians."""
  model, x, params, running = _tiny()

  @jax.jit
  def measure(params, running, x):
    stats = be.batch_statistics(model, params, running, x)
    train, c, a = (be.train_apply(model, running), be.eval_apply(model, stats),
                   be.eval_apply(model, running))
    outputs = (train(params, x), c(params, x), a(params, x))
    exact = kstep.gauss_newton_trace(c, params, x, loss="mse", method="exact").value
    est = kstep.gauss_newton_trace(train, params, x, loss="mse", key=jax.random.PRNGKey(4),
                                   num_probes=2000, chunk_size=1)
    dense = (_dense_trace(lambda p: c(p, x), params),
             _dense_trace(lambda p: train(p, x), params))
    return outputs, (exact, est.value, est.stderr), dense

  (train, c, a), (exact, hutchinson, stderr), (dense_c, dense_b) = measure(params, running, x)
  np.testing.assert_allclose(c, train, atol=1e-5)
  assert float(jnp.max(jnp.abs(a - train))) > 1e-2
  np.testing.assert_allclose(float(exact), float(dense_c), rtol=1e-4)
  assert abs(float(hutchinson) - float(dense_b)) < 4 * float(stderr) + 1e-3 * float(dense_b)
  # Train mode drops the directions that move the batch statistics: c's trace is larger.
  assert float(dense_c) > float(dense_b)


def test_divergence_step():
  assert be.divergence_step(np.ones(30), 1.0) is None
  assert be.divergence_step(np.r_[np.ones(5), np.nan, np.ones(5)], 1.0) == 5
  # One spike of 50× in a 10-step window is a mean of 5.9×; five steps at 20× one of 10.5×.
  assert be.divergence_step(np.r_[np.ones(10), 50.0, np.ones(10)], 1.0) is None
  assert be.divergence_step(np.r_[np.ones(10), np.full(10, 20.0)], 1.0) == 14


def test_search_brackets_both_edges():
  def run(lr):
    return {"lr": lr, "diverged_at": 3 if lr > 0.7 else None,
            "final_acc": 0.9 if lr < 0.15 else 0.2, "measurements": []}

  grid = tuple(0.0125 * 2 ** (k / 2) for k in range(14))
  out = be.search(run, grid, bisections=2)
  assert out["lr_stable"] < 0.7 < out["lr_divergent"] <= out["lr_stable"] * 2 ** 0.125 * 1.0001
  assert out["lr_trains"] < 0.15 < out["lr_fails"]
  assert out["lr_fails"] / out["lr_trains"] == pytest.approx(2 ** 0.5)


@pytest.mark.slow
def test_recommended_train_mode_apply_fn_runs_in_a_jitted_kstep_step():
  """docs/batchnorm.md's apply_fn: train mode, the closure's batch_stats only fill the mutable
  collection, so the changing running statistics need not reach kstep (B = 32: the estimates
  run on 16 probe rows)."""
  model = be.BNCNN(widths=(2, 3), num_classes=C)
  x = jax.random.normal(jax.random.PRNGKey(5), (32, 4, 4, 1))
  y = jax.nn.one_hot(jnp.arange(32) % C, C)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(6), x, train=False))(x)
  template = variables["batch_stats"]
  apply_fn = lambda p, b: model.apply({"params": p, "batch_stats": template}, b["x"],
                                      train=True, mutable=["batch_stats"])[0]
  opt = kstep.k_controlled_sgd(0.1, apply_fn=apply_fn, loss="mse", guard=None)

  @jax.jit
  def step(params, stats, state):
    def loss_fn(p):
      out, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
      return 0.5 * jnp.mean(jnp.sum(jnp.square(out - y), -1)), new["batch_stats"]

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = opt.update(grads, state, params, batch={"x": x, "y": y})
    return optax.apply_updates(params, updates), stats, state

  params, stats = variables["params"], variables["batch_stats"]
  state = opt.init(params)
  for _ in range(2):
    params, stats, state = step(params, stats, state)
  s = kstep.stats(state)
  assert np.isfinite(float(s["k"])) and float(s["k_trace"]) > 0


@pytest.mark.slow
def test_quick_command_writes_jsons_and_summary(tmp_path):
  text = be.main(["--quick", "--out", str(tmp_path), "--batch-sizes", "8", "--steps", "20"])
  assert (tmp_path / "mse_B=8_seed=0.json").exists()
  assert (tmp_path / "summary.md").read_text() == text
  assert "b: train, probe rows" in text
