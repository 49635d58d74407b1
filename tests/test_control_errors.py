"""The K controller's argument checks: construction-time errors name the argument (or the field
of ``kstep.Estimate`` / ``kstep.Guard``), ``update`` says how to pass a missing batch or params,
and a batch size that differs from the batch names both numbers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from control_helpers import (
  BAND,
  BASE_BATCH,
  B,
  controller,
  eta_one,
  exact_trace,
  init_params,
  linear_apply,
  make_batch,
  mse_loss,
)

import kstep

# ------------------------------------------------------------------------------------------------
# Construction-time validation


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"target": (0.8, 0.4)}, "target"),
        ({"target": (0.0, 0.8)}, "target"),
        ({"target": (-0.1, 0.5)}, "target"),
        ({"target": (0.5, 0.5)}, "target"),
        ({"target": (0.4,)}, "target"),
        ({"target": 0.5}, "target"),
        ({"target": (0.4, "high")}, "target"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -4}, "batch_size"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"loss": "hinge"}, "loss"),
        ({"loss": 3}, "loss"),
        ({"apply_fn": None}, "apply_fn"),
        ({"apply_fn": "model"}, "apply_fn"),
        ({"max_scale": 0.0}, "max_scale"),
        ({"trace_floor": -0.1}, "trace_floor"),
        ({"trace_floor": "sometimes"}, "trace_floor"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"nesterov": 1}, "nesterov"),
        ({"decay_steps": 0}, "decay_steps"),
        ({"decay_steps": 0.5}, "decay_steps"),
        ({"decay_steps": "cosine"}, "decay_steps"),
    ],
)
def test_construction_errors_name_the_argument(kwargs, name):
  args = {"batch_size": B, "apply_fn": linear_apply, **kwargs}
  with pytest.raises(ValueError, match=f"`{name}`"):
    kstep.k_controlled_sgd(0.1, **args)
  if name != "weight_decay":  # k_controlled_sgd only
    with pytest.raises(ValueError, match=f"`{name}`"):
      kstep.scale_by_k_control(0.1, **args)


@pytest.mark.parametrize(
    "group, kwargs, field",
    [
        (kstep.Estimate, {"every": 0}, "every"),
        (kstep.Estimate, {"every": 2.5}, "every"),
        (kstep.Estimate, {"num_probes": 0}, "num_probes"),
        (kstep.Estimate, {"estimator": "lanczos"}, "estimator"),
        (kstep.Estimate, {"smoothing": 1.0}, "smoothing"),
        (kstep.Estimate, {"max_change": 1.0}, "max_change"),
        (kstep.Estimate, {"output_norm": "mean"}, "output_norm"),
        (kstep.Estimate, {"seed": 1.5}, "seed"),
        (kstep.Estimate, {"seed": "0"}, "seed"),
        (kstep.Estimate, {"seed": True}, "seed"),
        (kstep.Estimate, {"probe_batch_size": 0}, "probe_batch_size"),
        (kstep.Estimate, {"probe_scope": "everywhere"}, "probe_scope"),
        (kstep.Guard, {"power_iters": 0}, "power_iters"),
        (kstep.Guard, {"ratio": 0.0}, "ratio"),  # its range: test_control_physics.py
        (kstep.Guard, {"refresh_every": 0}, "refresh_every"),
    ],
)
def test_option_errors_name_the_field(group, kwargs, field):
  with pytest.raises(ValueError, match=f"`{group.__name__}.{field}`"):
    group(**kwargs)


def test_guard_ratio_none_points_at_guard_none():
  with pytest.raises(ValueError, match=r"`Guard.ratio`.*`guard=None`"):
    kstep.Guard(ratio=None)
  kstep.k_controlled_sgd(0.1, apply_fn=linear_apply, guard=None)  # the guard off


def test_grouped_options_are_frozen_and_static_ints_refuse_a_tracer():
  with pytest.raises(Exception, match="cannot assign"):
    kstep.Estimate().every = 2
  with pytest.raises(Exception, match="cannot assign"):
    kstep.Guard().ratio = 0.3
  # An int that sets a shape or a loop bound cannot be traced; the message says what to do.
  for make in (lambda n: kstep.Estimate(num_probes=n), lambda n: kstep.Estimate(every=n),
               lambda n: kstep.Guard(power_iters=n), lambda n: kstep.Guard(refresh_every=n)):
    with pytest.raises(ValueError, match="static_args"):
      jax.jit(make)(2)


@pytest.mark.parametrize("value", [None, {"every": 1}, 10, kstep.Guard()])
def test_estimate_must_be_an_estimate(value):
  for factory in (kstep.k_controlled_sgd, kstep.scale_by_k_control):
    with pytest.raises(ValueError, match=r"`estimate` must be a kstep.Estimate"):
      factory(0.1, apply_fn=linear_apply, estimate=value)
  with pytest.raises(ValueError, match=r"`estimate` must be a kstep.Estimate"):
    kstep.value_and_grad(lambda out, b: out.sum(-1), linear_apply, estimate=value)


@pytest.mark.parametrize("value", ["auto", 0.5, {"ratio": 0.5}, kstep.Estimate()])
def test_guard_must_be_a_guard_or_none(value):
  for factory in (kstep.k_controlled_sgd, kstep.scale_by_k_control):
    with pytest.raises(ValueError, match=r"`guard` must be a kstep.Guard\(...\) or None"):
      factory(0.1, apply_fn=linear_apply, guard=value)
  with pytest.raises(ValueError, match=r"`guard` must be a kstep.Guard\(...\) or None"):
    kstep.value_and_grad(lambda out, b: out.sum(-1), linear_apply, guard=value)


@pytest.mark.parametrize("name, value", [
    ("every", 1), ("max_sharpness_ratio", None), ("sharpness_iters", 3), ("refresh_every", 8),
    ("band_decay", optax.constant_schedule(1.0)), ("flip_sign", True), ("output_norm", "total"),
])
def test_the_flat_options_are_gone(name, value):
  # v0.1 groups them in estimate= / guard=; band_decay is decay_steps=, flip_sign is removed.
  for factory in (kstep.k_controlled_sgd, kstep.scale_by_k_control):
    with pytest.raises(TypeError, match=name):
      factory(0.1, apply_fn=linear_apply, **{name: value})


@pytest.mark.parametrize(
    "learning_rate", [-0.5, 0.0, -1e-8, np.float32(-1.0), jnp.asarray(-0.5), np.nan, "0.1", None]
)
def test_learning_rate_must_be_positive(learning_rate):
  for factory in (kstep.k_controlled_sgd, kstep.scale_by_k_control):
    with pytest.raises(ValueError, match="`learning_rate`"):
      factory(learning_rate, apply_fn=linear_apply)
  # A schedule is checked by the user (its values may be anything); a positive float passes.
  kstep.k_controlled_sgd(optax.constant_schedule(0.1), apply_fn=linear_apply)
  kstep.k_controlled_sgd(0.5, apply_fn=linear_apply)


# ------------------------------------------------------------------------------------------------
# update: the missing batch or params, the batch size


def test_missing_batch_says_how_to_pass_it():
  params, batch = init_params(), make_batch(0)
  grads = jax.grad(mse_loss)(params, batch)
  for opt in (
      controller(0.1),
      kstep.scale_by_k_control(0.1, batch_size=B, apply_fn=linear_apply),
      optax.chain(optax.clip_by_global_norm(1.0), controller(0.1)),
  ):
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"batch=batch"):
      opt.update(grads, state, params)
    with pytest.raises(ValueError, match=r"batch=batch"):
      jax.jit(lambda g, s, p: opt.update(g, s, p))(grads, state, params)
    with pytest.raises(ValueError, match=r"needs `params`"):
      opt.update(grads, state, None, batch=batch)


def test_batch_size_mismatch_names_both_numbers():
  params = init_params()
  short = make_batch(0, n=6)
  grads = jax.grad(mse_loss)(params, short)
  for opt in (
      controller(0.1),
      optax.chain(optax.clip_by_global_norm(1.0), controller(0.1)),
      kstep.scale_by_k_control(0.1, batch_size=B, apply_fn=linear_apply),
  ):
    state = opt.init(params)
    for update in (opt.update, jax.jit(opt.update)):
      with pytest.raises(ValueError, match="`batch_size`") as info:
        update(grads, state, params, batch=short)
      assert re.search(rf"\b{B}\b", str(info.value)) and re.search(r"\b6\b", str(info.value))
  # batch_size=None (the default) reads B from each batch: K uses the batch's own size.
  opt = controller(1e3, batch_size=None)
  for batch in (BASE_BATCH, short):
    n = batch["x"].shape[0]
    g = jax.grad(mse_loss)(params, batch)
    _, state = jax.jit(lambda s, b, g: opt.update(g, s, params, batch=b))(opt.init(params), batch,
                                                                           g)
    np.testing.assert_allclose(float(kstep.stats(state)["k_learning_rate"]),
                               BAND[1] * eta_one(exact_trace(batch), 0.9, n), rtol=1e-5)
