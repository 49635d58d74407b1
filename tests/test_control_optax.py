"""The K controller inside optax: extra ``update`` keywords, chains, ``inject_hyperparams``,
``MultiSteps``, ``apply_if_finite``, ``lax.scan`` and ``vmap`` over runs, and ``kstep.stats``
through the wrappers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from control_helpers import (
  BAND,
  BASE_BATCH,
  EXACT,
  LAW,
  B,
  C,
  D,
  assert_state_finite,
  assert_trees_equal,
  avals,
  controller,
  eta_one,
  exact_trace,
  init_params,
  linear_apply,
  make_batch,
  make_step,
  mse_loss,
  run,
  scan_train,
  smoothed,
  stack,
)

import kstep


def test_accepts_unexpected_extra_kwargs():
  params, batch = init_params(), make_batch(0)
  grads = jax.grad(mse_loss)(params, batch)
  opt = controller(0.1)
  state = opt.init(params)
  ref_updates, ref_state = jax.jit(lambda g, s, p, b: opt.update(g, s, p, batch=b))(
      grads, state, params, batch
  )
  updates, new_state = jax.jit(
      lambda g, s, p, b, r: opt.update(g, s, p, batch=b, epoch=3, rng=r, note="x")
  )(grads, state, params, batch, jax.random.PRNGKey(1))
  assert_trees_equal(updates, ref_updates)
  assert_trees_equal(new_state, ref_state)
  assert int(kstep.stats(new_state)["k_num_estimates"]) == 1


def test_chain_with_clipping_and_weight_decay():
  params, batch = init_params(), make_batch(0, scale=3.0)
  grads = jax.grad(mse_loss)(params, batch)
  wd, mom, clip = 1e-2, 0.9, 0.5
  opt = optax.chain(
      optax.clip_by_global_norm(clip),
      optax.add_decayed_weights(wd),
      optax.trace(decay=mom),
      kstep.scale_by_k_control(
          100.0, batch_size=B, apply_fn=linear_apply, momentum=mom, estimate=EXACT, **LAW
      ),
  )
  update = lambda opt: jax.jit(lambda s: opt.update(grads, s, params, batch=batch))
  updates, state = update(opt)(opt.init(params))
  s = kstep.stats(state)
  eta = float(s["k_learning_rate"])
  np.testing.assert_allclose(eta, BAND[1] * eta_one(exact_trace(batch), mom), rtol=1e-5)
  gnorm = float(optax.tree.norm(grads))
  assert gnorm > clip  # the clip is active
  expected = -eta * (np.asarray(grads["w"]) * clip / gnorm + wd * np.asarray(params["w"]))
  np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-5, atol=1e-7)
  # The assembled optimizer inside a chain too.
  opt2 = optax.chain(optax.clip_by_global_norm(clip), controller(100.0, weight_decay=wd))
  updates2, _ = update(opt2)(opt2.init(params))
  np.testing.assert_allclose(np.asarray(updates2["w"]), expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# optax.inject_hyperparams: the grouped options (estimate=, guard=) are passed as they are, so
# only apply_fn must be listed static; the floats around them are injected.


@pytest.mark.parametrize(
    "static_args, momentum, weight_decay",
    [
        (("apply_fn", "loss", "batch_size", "target", "estimate", "guard"), 0.9, 0.0),
        (("apply_fn",), 0.0, 1e-3),
    ],
)
def test_inject_hyperparams(static_args, momentum, weight_decay):
  # A Python 0.0 is injected as an array: the chain must hold the same parts in `init` (concrete
  # arrays) and in a jitted `update` (tracers).
  kwargs = dict(
      batch_size=B, apply_fn=linear_apply, momentum=momentum, weight_decay=weight_decay,
      estimate=kstep.Estimate(output_norm="total", estimator="exact", every=2, num_probes=2,
                              seed=3),
      **LAW,
  )
  opt = optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=static_args)(
      learning_rate=100.0, **kwargs
  )
  ref = kstep.k_controlled_sgd(100.0, **kwargs)
  step, ref_step = make_step(opt), make_step(ref)
  params = ref_params = init_params()
  state, ref_state = opt.init(params), ref.init(params)
  for t in range(4):
    batch = make_batch(t)
    params, state, _ = step(params, state, batch, batch)
    ref_params, ref_state, _ = ref_step(ref_params, ref_state, batch, batch)
    s = kstep.stats(state)
    np.testing.assert_allclose(
        float(s["k_learning_rate"]), float(kstep.stats(ref_state)["k_learning_rate"]), rtol=1e-6
    )
  np.testing.assert_allclose(
      np.asarray(params["w"]), np.asarray(ref_params["w"]), rtol=1e-5, atol=1e-7
  )
  assert step._cache_size() == 1
  assert int(s["k_num_estimates"]) == 2
  np.testing.assert_allclose(float(s["k"]), BAND[1], rtol=1e-5)
  # The injected base LR can be changed in the state; an in-band value passes unchanged.
  inside = 0.6 * eta_one(float(s["k_trace"]), momentum)
  state.hyperparams["learning_rate"] = jnp.asarray(inside, jnp.float32)
  params, state, _ = step(params, state, make_batch(4), make_batch(4))
  s = kstep.stats(state)
  assert float(s["k_learning_rate"]) == float(s["k_base_learning_rate"]) == np.float32(inside)


def test_inject_hyperparams_traced_trace_floor_and_max_scale():
  # Defaults otherwise (the cross-entropy's total norm, the guard on at a given ratio): the
  # floats trace_floor and max_scale are injected ("auto", the default, stays static); the
  # Guard and the Estimate are passed as they are, never injected.
  opt = optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=("apply_fn",))(
      learning_rate=1e-4, batch_size=B, apply_fn=linear_apply, loss="softmax_cross_entropy",
      trace_floor=0.05, max_scale=2.0, estimate=kstep.Estimate(estimator="exact"),
      guard=kstep.Guard(ratio=0.25),
  )
  hyperparams = set(opt.init(init_params()).hyperparams)
  assert {"trace_floor", "max_scale"} <= hyperparams
  assert not {"estimate", "guard"} & hyperparams
  params = init_params()
  _, state, _ = make_step(opt)(params, opt.init(params), make_batch(0), make_batch(0))
  s = kstep.stats(state)
  np.testing.assert_allclose(float(s["k_learning_rate"]), 2e-4, rtol=1e-6)  # max_scale caps it
  # The floor acts on the kernel scale S (the total trace for the cross-entropy) that sets K and
  # the step; k_trace reports the Gauss–Newton trace itself.
  ntk = exact_trace(make_batch(0))
  assert float(s["k_scale"]) >= 0.05 * ntk * (1 - 1e-5)
  np.testing.assert_allclose(float(s["k_scale"]), max(float(s["k_trace"]), 0.05 * ntk), rtol=1e-5)
  # With the defaults (num_probes, power_iters, ... inside the default Estimate and Guard) no
  # int that sets a shape is injected; a traced one is refused (test_control_errors.py).
  defaults = optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=("apply_fn",))(
      learning_rate=0.1, batch_size=B, apply_fn=linear_apply,
  )
  assert not {"estimate", "guard"} & set(defaults.init(params).hyperparams)


@pytest.mark.parametrize("weight_decay", [pytest.param(None, marks=pytest.mark.slow), 0.0, 1e-4])
def test_injected_state_has_the_plain_tree(weight_decay):
  params = init_params()
  kwargs = {} if weight_decay is None else {"weight_decay": weight_decay}
  plain = kstep.k_controlled_sgd(0.1, apply_fn=linear_apply, **kwargs)
  injected = optax.inject_hyperparams(kstep.k_controlled_sgd, static_args=("apply_fn",))(
      0.1, apply_fn=linear_apply, **kwargs
  )
  plain_state, injected_state = plain.init(params), injected.init(params)
  assert jax.tree.structure(injected_state.inner_state) == jax.tree.structure(plain_state)
  assert ("weight_decay" in injected_state.hyperparams) == (weight_decay is not None)
  if weight_decay is None:  # optax.sgd's chain: momentum, then the step (here the controller)
    sgd = optax.inject_hyperparams(optax.sgd)(0.1, momentum=0.9).init(params).inner_state
    assert len(plain_state) == len(sgd) == 2
    assert jax.tree.structure(plain_state[0]) == jax.tree.structure(sgd[0])
    assert isinstance(plain_state[0], optax.TraceState)
    assert isinstance(plain_state[1], kstep.ScaleByKControlState)
  else:  # weight decay is a part of the chain, injected or not
    assert len(plain_state) == 3
  if weight_decay is not None:
    return
  # The tree stays after a jitted update (apply_fn the only static argument optax needs).
  state = injected.init(params)
  _, state, _ = make_step(injected)(params, state, BASE_BATCH, BASE_BATCH)
  assert jax.tree.structure(state.inner_state) == jax.tree.structure(plain_state)
  assert avals(state) == avals(injected.init(params))


# ------------------------------------------------------------------------------------------------
# Other wrappers


def test_multi_steps():
  k_steps = 2
  opt = optax.MultiSteps(
      kstep.scale_by_k_control(
          100.0, batch_size=B, apply_fn=linear_apply,
          estimate=kstep.Estimate(output_norm="total", estimator="exact", every=1), **LAW
      ),
      every_k_schedule=k_steps,
  )
  step = make_step(opt)
  params = init_params()
  state = opt.init(params)
  grads, emitted_traces = [], []
  for t in range(4):
    batch = make_batch(t)
    grads.append(np.asarray(jax.grad(mse_loss)(params, batch)["w"]))
    new_params, state, updates = step(params, state, batch, batch)
    s = kstep.stats(state)
    if t % k_steps == 0:  # accumulating: no update, inner state untouched
      assert_trees_equal(new_params, params)
      assert int(state.inner_opt_state.count) == t // k_steps
    else:  # emit: −η · mean of the accumulated gradients; the trace seen on the last micro-batch
      emitted_traces.append(exact_trace(batch))
      trace = smoothed(emitted_traces)
      np.testing.assert_allclose(float(s["k_trace"]), trace, rtol=1e-5)
      eta = float(s["k_learning_rate"])
      np.testing.assert_allclose(eta, BAND[1] * eta_one(trace, 0.0), rtol=1e-5)
      mean_g = (grads[-2] + grads[-1]) / 2
      np.testing.assert_allclose(np.asarray(updates["w"]), -eta * mean_g, rtol=1e-5, atol=1e-7)
      assert int(state.inner_opt_state.count) == (t + 1) // k_steps
    params = new_params
  assert int(s["k_num_estimates"]) == 2
  assert step._cache_size() == 1


def _unit_rows(seed, n):
  """A batch whose rows have unit norm: every example has the same NTK trace C, so a
  micro-batch's T is the whole batch's exactly."""
  batch = make_batch(seed, n=n)
  x = batch["x"] / jnp.linalg.norm(batch["x"], axis=1, keepdims=True)
  return dict(batch, x=x)


def test_accumulated_micro_batches_get_the_effective_batch_k_and_step():
  """optax.MultiSteps over 4 micro-batches of 16 with ``batch_size=64`` takes the step and
  reports the K of the same data as one batch of 64 (exact estimator: to float32 rounding);
  reading B = 16 from the micro-batch instead gives a step 4× too small."""
  micro, n = 16, 4
  kwargs = dict(apply_fn=linear_apply, target=BAND, guard=None,
                estimate=kstep.Estimate(estimator="exact", every=1, probe_batch_size=micro))
  whole = kstep.k_controlled_sgd(100.0, **kwargs)
  accumulated = optax.MultiSteps(kstep.k_controlled_sgd(100.0, batch_size=n * micro, **kwargs),
                                 n)
  naive = optax.MultiSteps(kstep.k_controlled_sgd(100.0, **kwargs), n)
  params = {"w": init_params()["w"]}
  p_whole = p_acc = p_naive = params
  s_whole, s_acc, s_naive = whole.init(params), accumulated.init(params), naive.init(params)
  step_whole, step_acc, step_naive = make_step(whole), make_step(accumulated), make_step(naive)
  for t in range(3):
    parts = [_unit_rows(10 * t + i, micro) for i in range(n)]
    batch = jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *parts)
    p_whole, s_whole, _ = step_whole(p_whole, s_whole, batch, batch)
    for part in parts:
      p_acc, s_acc, _ = step_acc(p_acc, s_acc, part, part)
      p_naive, s_naive, _ = step_naive(p_naive, s_naive, part, part)
    a, w, v = kstep.stats(s_acc), kstep.stats(s_whole), kstep.stats(s_naive)
    for name in ("k", "k_learning_rate", "k_trace"):
      np.testing.assert_allclose(float(a[name]), float(w[name]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(p_acc["w"]), np.asarray(p_whole["w"]), rtol=2e-5,
                               atol=1e-6)
    if t == 0:  # the band's top sets the step: B = 16 gives a quarter of it
      np.testing.assert_allclose(float(v["k_learning_rate"]), float(w["k_learning_rate"]) / n,
                                 rtol=1e-5)
  with pytest.raises(ValueError, match="multiple"):
    step_acc(p_acc, s_acc, _unit_rows(0, 24), _unit_rows(0, 24))


def test_stats_through_wrappers_and_ambiguity():
  params = init_params()
  inner = controller(0.1)
  for state in (
      inner.init(params),
      optax.MultiSteps(inner, 2).init(params),
      optax.apply_if_finite(inner, 3).init(params),
      optax.inject_hyperparams(optax.sgd)(0.1).init(params) + (inner.init(params),),
      {"a": [inner.init(params)]},
  ):
    s = kstep.stats(state)
    assert set(s) == set(kstep.ScaleByKControlState.STATS_FIELDS)
  assert int(optax.tree.get(inner.init(params), "k_num_estimates")) == 0
  with pytest.raises(ValueError, match="several kstep transforms"):
    kstep.stats((inner.init(params), inner.init(params)))


def test_apply_if_finite_skips_non_finite_gradients():
  every1 = kstep.Estimate(output_norm="total", estimator="exact", every=1)
  opt = optax.apply_if_finite(controller(1e3, estimate=every1), max_consecutive_errors=5)
  step = jax.jit(lambda g, s, p, b: opt.update(g, s, p, batch=b))
  params = init_params()
  grads = jax.grad(mse_loss)(params, BASE_BATCH)
  state = opt.init(params)
  updates, state = step(grads, state, params, BASE_BATCH)
  assert int(kstep.stats(state)["k_num_estimates"]) == 1
  bad = jax.tree.map(lambda g: g.at[0, 0].set(jnp.nan), grads)
  before = state
  updates, state = step(bad, state, params, BASE_BATCH)
  assert int(state.notfinite_count) == 1
  assert_trees_equal(state.inner_state, before.inner_state)
  np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
  updates, state = step(grads, state, params, BASE_BATCH)
  s = kstep.stats(state)
  assert int(s["k_num_estimates"]) == 2 and int(state.inner_state[-1].count) == 2
  np.testing.assert_allclose(float(s["k"]), BAND[1], rtol=1e-5)
  assert_state_finite(state, guard=False)


# ------------------------------------------------------------------------------------------------
# lax.scan over steps, vmap over runs


@pytest.mark.slow
def test_lax_scan_over_steps_matches_python_loop():
  opt = kstep.k_controlled_sgd(
      10.0, batch_size=B, apply_fn=linear_apply, momentum=0.9,
      estimate=kstep.Estimate(every=3, seed=1),
  )
  batches = [make_batch(t, scale=1.0 + 0.1 * t) for t in range(9)]
  params = init_params()
  p_scan, s_scan, h_scan = scan_train(opt)(params, stack(batches))
  p_loop, s_loop, h_loop = run(opt, params, batches)
  np.testing.assert_allclose(np.asarray(p_scan["w"]), np.asarray(p_loop["w"]), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(h_scan["k"]), [h["k"] for h in h_loop], rtol=1e-5
  )
  np.testing.assert_array_equal(np.asarray(h_scan["k_num_estimates"]), [1, 1, 1, 2, 2, 2, 3, 3, 3])
  assert avals(s_scan) == avals(s_loop)


@pytest.mark.slow
def test_vmap_over_seeds_and_param_inits():
  n = 4
  batches = stack([make_batch(t) for t in range(6)])

  def train(seed, params):
    opt = kstep.k_controlled_sgd(
        10.0, batch_size=B, apply_fn=linear_apply,
        estimate=kstep.Estimate(output_norm="total", every=2, seed=seed), **LAW
    )
    return scan_train(opt)(params, batches)

  seeds = jnp.arange(n, dtype=jnp.int32)
  params = stack([init_params(i) for i in range(n)])
  p_vm, _, h_vm = jax.jit(jax.vmap(train))(seeds, params)
  assert p_vm["w"].shape == (n, D, C)
  for i in range(n):
    p_i, _, h_i = jax.jit(train)(seeds[i], init_params(i))
    # Equal to float32 rounding: 1e-5 of each element, or of the weights' scale for an element
    # that cancels to near zero (the per-seed run rounds differently from the vmapped one).
    w_i = np.asarray(p_i["w"])
    np.testing.assert_allclose(np.asarray(p_vm["w"][i]), w_i, rtol=1e-5,
                               atol=1e-5 * np.abs(w_i).max())
    np.testing.assert_allclose(
        np.asarray(h_vm["k_trace"][i]), np.asarray(h_i["k_trace"]), rtol=1e-5
    )
  # The probes depend on the seed: four seeds, four different first estimates.
  assert len(np.unique(np.asarray(h_vm["k_trace_raw"][:, 0]))) == n
  np.testing.assert_array_equal(np.asarray(h_vm["k_num_estimates"][:, -1]), [3] * n)
  np.testing.assert_allclose(np.asarray(h_vm["k"]), BAND[1], rtol=1e-5)
