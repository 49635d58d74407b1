"""Tests of the fused path (``kstep.value_and_grad`` feeding ``update(..., probe=...)``).

References: ``jax.value_and_grad`` of the mean per-example loss (the loss and gradient, in every
estimate mode, also when the probe rows do not divide the batch), and the unfused controller on
the same batches (the fused estimate uses the same probes and rows, so states and params agree to
float32 rounding). The unfused estimate itself is tested against dense Jacobians and Hessians in
``test_k_estimate.py`` and ``test_control.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep
from kstep._src import control_state

D, H, C = 6, 16, 4
rng = np.random.default_rng(0)
PARAMS = {"w1": jnp.asarray(rng.normal(size=(D, H)) / np.sqrt(D), jnp.float32),
          "w2": jnp.asarray(rng.normal(size=(H, C)) / np.sqrt(H), jnp.float32)}


def mlp(params, batch):
  return jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"]


PER_EXAMPLE = {
    "mse": lambda out, batch: 0.5 * jnp.sum(jnp.square(out - batch["y"]), axis=-1),
    "softmax_cross_entropy": lambda out, batch: optax.softmax_cross_entropy(out, batch["y"]),
}


def make_batch(seed, n=64):
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, D)).astype(np.float32)
  labels = r.integers(0, C, size=n)
  return {"x": jnp.asarray(x), "y": jax.nn.one_hot(labels, C)}


def mean_loss(loss_name):
  return lambda p, b: jnp.mean(PER_EXAMPLE[loss_name](mlp(p, b), b))


@pytest.mark.parametrize("loss_name", ["mse", "softmax_cross_entropy"])
def test_fused_run_matches_unfused_run(loss_name):
  # every=2, refresh_every=2: the run passes through cold, full, light and no-estimate steps
  # (for CE the band (0.4, 0.8) and r = 0.5 keep the step below half the guard's cap, where
  # light estimates happen); the CE default has the trace floor (its NTK probe rides on full
  # estimates).
  ce = {} if loss_name == "mse" else dict(target=(0.4, 0.8))
  guard = kstep.Guard(ratio=0.5 if loss_name != "mse" else "auto", refresh_every=2)
  estimate = kstep.Estimate(every=2)
  opt = kstep.k_controlled_sgd(0.5, apply_fn=mlp, loss=loss_name, estimate=estimate,
                               guard=guard, **ce)
  grad_fn = kstep.value_and_grad(PER_EXAMPLE[loss_name], mlp, loss=loss_name,
                                 estimate=estimate, guard=guard)

  @jax.jit
  def fused_step(params, state, batch):
    (loss, probe), grads = grad_fn(params, batch, state=state)
    updates, state = opt.update(grads, state, params, batch=batch, probe=probe)
    return optax.apply_updates(params, updates), state, loss, grads

  @jax.jit
  def plain_step(params, state, batch):
    loss, grads = jax.value_and_grad(mean_loss(loss_name))(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss, grads

  p1 = p2 = PARAMS
  s1 = s2 = opt.init(PARAMS)
  modes = set()
  for i in range(16):
    batch = make_batch(i)
    modes.add(int(kstep._src.fused.controller_state(s1).next_estimate))
    p1, s1, l1, g1 = fused_step(p1, s1, batch)
    p2, s2, l2, g2 = plain_step(p2, s2, batch)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
  assert modes == {control_state.NONE, control_state.COLD, control_state.FULL,
                   control_state.LIGHT}
  a, b = kstep.stats(s1), kstep.stats(s2)
  assert int(a["k_num_estimates"]) == int(b["k_num_estimates"]) == 8
  assert int(a["sharpness_num_estimates"]) == int(b["sharpness_num_estimates"]) >= 4
  for name in ("k_trace", "k_scale", "k_trace_raw", "gn_lambda_max", "k_learning_rate", "k"):
    np.testing.assert_allclose(a[name], b[name], rtol=1e-4, err_msg=name)
  if loss_name == "softmax_cross_entropy":
    assert np.isfinite(a["k_ntk_scale"])
    np.testing.assert_allclose(a["k_ntk_scale"], b["k_ntk_scale"], rtol=1e-4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), p1, p2)


@pytest.mark.parametrize("n", [64, 70, 12])
@pytest.mark.parametrize("mode", ["NONE", "COLD", "FULL", "LIGHT"])
def test_loss_and_gradient_are_jax_value_and_grad_in_every_mode(mode, n):
  # 70 rows: stride 4 (16 probe rows by default) leaves 18 probe rows and 52 others; 12 rows:
  # fewer than the probe batch (the probe is the whole batch).
  opt = kstep.k_controlled_sgd(0.1, apply_fn=mlp, loss="softmax_cross_entropy")
  trace_state, ctl = opt.init(PARAMS)  # optax.trace (momentum), then the controller
  state = (trace_state, ctl._replace(next_estimate=jnp.int32(getattr(control_state, mode))))
  batch = make_batch(1, n)
  grad_fn = kstep.value_and_grad(PER_EXAMPLE["softmax_cross_entropy"], mlp,
                                 loss="softmax_cross_entropy")
  (loss, probe), grads = jax.jit(lambda p, b, s: grad_fn(p, b, state=s))(PARAMS, batch, state)
  ref_loss, ref_grads = jax.value_and_grad(mean_loss("softmax_cross_entropy"))(PARAMS, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               ref_grads)
  measured = mode in ("FULL", "LIGHT")
  assert np.isfinite(probe.trace) == measured  # NaN where this step has no fused estimate
  assert np.isfinite(probe.lambda_max) == (mode == "FULL")
  assert np.isfinite(probe.ntk_trace) == (mode == "FULL")  # the floor's probe: full only


def test_tuple_batches_and_leaves_without_rows_are_split_right():
  # batch = (x, y, temperature): a tuple (not a dict) and a scalar leaf that every row shares.
  apply_fn = lambda p, batch: mlp(p, {"x": batch[0]}) / batch[2]
  per_example = lambda out, batch: optax.softmax_cross_entropy(out, batch[1])
  b = make_batch(2, 70)
  batch = (b["x"], b["y"], jnp.float32(2.0))
  opt = kstep.k_controlled_sgd(0.1, apply_fn=apply_fn, loss="softmax_cross_entropy")
  trace_state, ctl = opt.init(PARAMS)
  state = (trace_state, ctl._replace(next_estimate=jnp.int32(control_state.FULL)))
  grad_fn = kstep.value_and_grad(per_example, apply_fn, loss="softmax_cross_entropy")
  (loss, probe), grads = grad_fn(PARAMS, batch, state=state)
  ref_loss, ref_grads = jax.value_and_grad(
      lambda p: jnp.mean(per_example(apply_fn(p, batch), batch)))(PARAMS)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               ref_grads)
  assert np.isfinite(probe.trace) and np.isfinite(probe.lambda_max)


def test_fused_step_runs_under_transfer_guard_without_recompiling():
  opt = kstep.k_controlled_sgd(0.5, apply_fn=mlp, estimate=kstep.Estimate(every=2),
                               decay_steps=20)
  grad_fn = kstep.value_and_grad(PER_EXAMPLE["mse"], mlp)

  @jax.jit
  def step(params, state, batch):
    (loss, probe), grads = grad_fn(params, batch, state=state)
    updates, state = opt.update(grads, state, params, batch=batch, probe=probe)
    return optax.apply_updates(params, updates), state, loss

  params, state = PARAMS, opt.init(PARAMS)
  batches = [jax.device_put(make_batch(i)) for i in range(8)]
  params, state, _ = step(params, state, batches[0])
  with jax.transfer_guard("disallow"):
    for batch in batches[1:]:
      params, state, loss = step(params, state, batch)
  assert step._cache_size() == 1
  assert np.isfinite(float(loss))
  assert int(kstep.stats(state)["k_num_estimates"]) == 4


def test_mismatched_configuration_raises_naming_the_argument():
  opt = kstep.k_controlled_sgd(0.5, apply_fn=mlp)
  state = opt.init(PARAMS)
  batch = make_batch(0)
  for kwargs, name in [(dict(estimate=kstep.Estimate(probe_batch_size=32)), "probe_batch_size"),
                       (dict(guard=kstep.Guard(power_iters=2)), "power_iters"),
                       (dict(trace_floor=0.03), "trace_floor"),
                       (dict(loss="softmax_cross_entropy"), "loss")]:
    grad_fn = kstep.value_and_grad(PER_EXAMPLE["mse"], mlp, **kwargs)
    (_, probe), grads = grad_fn(PARAMS, batch, state=state)
    with pytest.raises(ValueError, match=name):
      opt.update(grads, state, PARAMS, batch=batch, probe=probe)
  with pytest.raises(ValueError, match="num_probes=1"):
    other = kstep.k_controlled_sgd(0.5, apply_fn=mlp, estimate=kstep.Estimate(num_probes=2))
    (_, probe), grads = kstep.value_and_grad(PER_EXAMPLE["mse"], mlp)(
        PARAMS, batch, state=other.init(PARAMS))
    other.update(grads, other.init(PARAMS), PARAMS, batch=batch, probe=probe)
  with pytest.raises(ValueError, match="kstep.value_and_grad"):
    opt.update(grads, state, PARAMS, batch=batch, probe={"trace": 1.0})


def test_bad_arguments_and_states_raise():
  with pytest.raises(ValueError, match="per_example_loss"):
    kstep.value_and_grad(None, mlp)
  with pytest.raises(ValueError, match="named `loss`"):
    kstep.value_and_grad(PER_EXAMPLE["mse"], mlp, loss=PER_EXAMPLE["mse"])
  with pytest.raises(ValueError, match="`estimate`"):
    kstep.value_and_grad(PER_EXAMPLE["mse"], mlp, estimate=dict(probe_batch_size=16))
  with pytest.raises(ValueError, match="`guard`"):
    kstep.value_and_grad(PER_EXAMPLE["mse"], mlp, guard=0.5)
  # None means the whole batch, as in the controller: a whole-batch controller accepts it.
  whole = kstep.Estimate(probe_batch_size=None)
  opt = kstep.k_controlled_sgd(0.5, apply_fn=mlp, estimate=whole)
  state, batch = opt.init(PARAMS), make_batch(0)
  (_, probe), grads = kstep.value_and_grad(PER_EXAMPLE["mse"], mlp, estimate=whole)(
      PARAMS, batch, state=state)
  opt.update(grads, state, PARAMS, batch=batch, probe=probe)
  grad_fn = kstep.value_and_grad(PER_EXAMPLE["mse"], mlp)
  sgd_state = optax.sgd(0.1).init(PARAMS)
  with pytest.raises(ValueError, match="holds 0"):
    grad_fn(PARAMS, make_batch(0), state=sgd_state)
