"""Training with the K controller: convergence on a quadratic and a small regression, the ReLU
regression at the band's upper edge (a known limitation, and the curvature guard that fixes it),
and the band held for any base LR on scikit-learn's bundled digits (MLP 64-128-128-10, B = 64,
momentum 0.9). All but the quadratic are slow."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from control_helpers import (
  BAND,
  LAW,
  B,
  C,
  D,
  controller,
  eta_one,
  exact_trace,
  mlp_apply,
  mlp_init,
  mse_loss,
  scan_train,
)

import kstep
from kstep._src import options

# ------------------------------------------------------------------------------------------------
# Convergence


def sampled_batches(data, num_steps, batch_size, seed=0):
  """Stacked mini-batches drawn without replacement within each batch."""
  n = len(jax.tree.leaves(data)[0])
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.choice(n, batch_size, replace=False) for _ in range(num_steps)])
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[idx]), data)


def test_converges_on_a_quadratic():
  # Realisable least squares: the loss is a quadratic with minimum 0. The base LR is 1e3 times
  # the step at K = 1; plain SGD with it diverges.
  n = 128
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, D)).astype(np.float32)
  w_star = rng.normal(size=(D, C)).astype(np.float32)
  data = {"x": x, "y": x @ w_star, "scale": np.ones((n, 1), np.float32)}
  full = jax.tree.map(jnp.asarray, data)
  batches = sampled_batches(data, 300, B)
  base = 1e3 * eta_one(exact_trace(full), 0.9)
  params = {"w": jnp.zeros((D, C))}
  p, state, h = scan_train(controller(base))(params, batches)
  initial, final = float(mse_loss(params, full)), float(mse_loss(p, full))
  assert final < 1e-6 * initial
  np.testing.assert_allclose(np.asarray(p["w"]), w_star, atol=1e-3)
  assert np.all(np.asarray(h["k"]) <= BAND[1] * (1 + 1e-5))
  p_sgd, _, _ = scan_train(optax.sgd(base, momentum=0.9))(params, batches)
  assert not np.isfinite(float(mse_loss(p_sgd, full))) or float(mse_loss(p_sgd, full)) > initial


def regression_data(n=256):
  rng = np.random.default_rng(1)
  x = rng.uniform(-2, 2, size=(n, 2)).astype(np.float32)
  y = (np.sin(2 * x[:, :1]) * np.cos(x[:, 1:])).astype(np.float32)
  return {"x": x, "y": y}


def tanh_apply(params, batch):
  x = batch["x"]
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def regression_run(apply_fn, batch_size, num_steps, config):
  """``train(base_lr)`` -> (final full-data loss, stacked stats); one compile for every LR.
  ``config``: more arguments of the controller (``{}``: its defaults)."""
  data = regression_data()
  full = jax.tree.map(jnp.asarray, data)
  batches = sampled_batches(data, num_steps, batch_size)
  loss = functools.partial(mse_loss, apply_fn=apply_fn)

  @jax.jit
  def train(learning_rate):
    opt = kstep.k_controlled_sgd(
        learning_rate, batch_size=batch_size, apply_fn=apply_fn, momentum=0.9, **config
    )
    p, _, history = scan_train(opt, loss)(mlp_init(0, (2, 64, 64, 1)), batches)
    return loss(p, full), history

  return train, 0.5 * float(np.var(data["y"]))


@pytest.mark.slow
def test_converges_on_a_small_regression_problem():
  # The defaults: one output, so the per-output band (0.25, 0.4) is the band on the trace, and
  # the guard on. The old default, the band (0.4, 0.8) on the trace with no guard, sits at this
  # model's edge: its final loss depended on the probes' draws (0.011-0.058 of the baseline
  # over seeds 0-4, and a divergence at seed 1 after the estimator's rewrite). Measured with the
  # defaults: 0.043 and 0.025 of the baseline at seed 0 (0.019-0.043 over seeds 0-3).
  train, baseline = regression_run(tanh_apply, 16, 1500, {})
  lo, hi = options.DEFAULT_TARGETS["per_output"]
  for base_lr in (1e-3, 10.0):
    final, history = train(base_lr)
    assert float(final) < 0.05 * baseline
    k = np.asarray(history["k"])
    assert lo * (1 - 1e-5) <= np.median(k) <= hi * (1 + 1e-5)
    assert int(history["k_num_skipped"][-1]) == 0


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="known limitation: the trace bound K does not see the deterministic edge. A ReLU net "
    "loses its units, the NTK trace falls to the output bias's (T = λ_max = 1), the band's upper "
    "edge raises η to 0.8·2αB/T ≈ 5 > 2(1 + μ)/λ_max = 3.8, and the bias diverges.",
)
def test_relu_regression_at_the_upper_edge_does_not_diverge():
  # Over the probes' seeds 0-3 (measured: seeds 2 and 3 end NaN; 0 and 1 happen to survive).
  for seed in range(4):
    config = {**LAW, "estimate": kstep.Estimate(output_norm="total", seed=seed)}  # no guard
    train, baseline = regression_run(mlp_apply, 32, 1000, config)
    final, _ = train(10.0)
    assert np.isfinite(float(final)) and float(final) < baseline


@pytest.mark.slow
def test_curvature_guard_keeps_the_relu_regression_at_the_upper_edge_finite():
  # The run of the known limitation above, annealed over the run (decay_steps, the recipe for a
  # run of known length) and with the curvature guard at its default ratio for MSE: it keeps
  # η·λ_max ≤ 0.5 · 2(1 + μ) and trains on every seed (measured: 0.005-0.09 of the baseline;
  # annealed without the guard seed 3 ends at the baseline, its units dead). With the constant
  # band the guarded run stays identical to a float-rounding change until step ~700, where the
  # net has lost most units, λ_max ≈ 1-3 and η ≈ 0.6-1.4; there 2 of these 4 seeds diverged
  # after the unrolled-VJP change (8c441b5) and none before it: the kinks of a ReLU net, not its
  # curvature, decide that regime, so this test anneals.
  for seed in range(4):
    config = {**LAW, "guard": kstep.Guard(ratio=options.DEFAULT_MAX_SHARPNESS_RATIO),
              "estimate": kstep.Estimate(output_norm="total", seed=seed), "decay_steps": 1000}
    train, baseline = regression_run(mlp_apply, 32, 1000, config)
    final, history = train(10.0)
    assert np.isfinite(float(final)) and float(final) < 0.5 * baseline, seed
    ratio = np.asarray(history["sharpness_ratio"])
    assert np.all(ratio <= options.DEFAULT_MAX_SHARPNESS_RATIO * (1 + 1e-5))
    assert int(history["k_num_capped"][-1]) > 0


# ------------------------------------------------------------------------------------------------
# Control on real data: scikit-learn's bundled digits, MLP 64-128-128-10, B = 64, momentum 0.9.

DIGITS_BATCH = 64


@pytest.fixture(scope="module")
def digits():
  datasets = pytest.importorskip("sklearn.datasets")
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm].astype(np.int32)
  return {"x": x[:1400], "label": y[:1400]}, {"x": x[1400:], "label": y[1400:]}


def digits_loss(kind):
  def loss(params, batch):
    logits = mlp_apply(params, batch)
    if kind == "mse":  # ½ Σ_c (f_c − y_c)² with one-hot targets: H = I, the named "mse"
      return 0.5 * jnp.mean(jnp.sum(jnp.square(logits - jax.nn.one_hot(batch["label"], 10)), -1))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  return loss


def digits_trainer(digits, kind, num_steps, controlled=True):
  """``train(base_lr)`` -> (final train loss, test accuracy, K per step); one compile per call of
  this function, every base LR then reuses it (the base LR is a traced argument)."""
  train_set, test_set = jax.tree.map(jnp.asarray, digits)
  idx = sampled_batches({"i": np.arange(1400)}, num_steps, DIGITS_BATCH, seed=1)["i"]
  loss = digits_loss(kind)

  @jax.jit
  def train(learning_rate, train_set, test_set, idx):
    if controlled:
      opt = kstep.k_controlled_sgd(
          learning_rate, batch_size=DIGITS_BATCH, apply_fn=mlp_apply, momentum=0.9,
          loss="mse" if kind == "mse" else "softmax_cross_entropy",
          estimate=kstep.Estimate(output_norm="total"), **LAW,
      )
    else:
      opt = optax.sgd(optax.cosine_decay_schedule(learning_rate, num_steps), momentum=0.9)
    batches = jax.tree.map(lambda a: a[idx], train_set)
    params, state, history = scan_train(opt, loss)(mlp_init(0, (64, 128, 128, 10)), batches)
    accuracy = jnp.mean(jnp.argmax(mlp_apply(params, test_set), -1) == test_set["label"])
    k = history["k"] if controlled else jnp.zeros(num_steps)
    return loss(params, train_set), accuracy, k

  return lambda lr: jax.tree.map(
      np.asarray, train(jnp.float32(lr), train_set, test_set, idx)
  )


def check_digits(digits, kind, learning_rates, num_steps):
  train = digits_trainer(digits, kind, num_steps)
  accuracies = []
  for lr in learning_rates:
    train_loss, accuracy, k = train(lr)
    assert np.all(np.isfinite(k)) and np.isfinite(train_loss), (kind, lr)
    assert BAND[0] * (1 - 1e-5) <= np.median(k) <= BAND[1] * (1 + 1e-5), (kind, lr)
    assert train_loss < (0.05 if kind == "cross_entropy" else 0.03), (kind, lr, train_loss)
    assert accuracy > 0.97, (kind, lr, accuracy)
    accuracies.append(float(accuracy))
  assert max(accuracies) - min(accuracies) < 0.02, (kind, accuracies)
  # The same schedule-free base LRs through optax.sgd with a cosine schedule: 10 diverges.
  train_loss, accuracy, _ = digits_trainer(digits, kind, num_steps, controlled=False)(10.0)
  assert not np.isfinite(train_loss) or accuracy < 0.2, (kind, train_loss, accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_digits_k_stays_in_band_for_any_base_lr(digits, kind):
  # Measured (2,000 steps): MSE accuracy 0.990-0.992, train loss 0.004-0.013; CE accuracy
  # 0.985-0.990, train loss 4e-4-2e-3; median K 0.4 (base 1e-3) and 0.8 (0.1, 10).
  check_digits(digits, kind, (1e-3, 1e-1, 10.0), 2000)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_digits_k_stays_in_band_for_any_base_lr_full(digits, kind):
  check_digits(digits, kind, (1e-3, 1e-2, 1e-1, 1.0, 10.0), 3000)
