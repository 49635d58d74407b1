"""``kstep.inject_hyperparams``: optax's ``inject_hyperparams`` with the static arguments listed.

A small linear model ``f = x W + b`` with MSE; each kstep factory is built plainly and through
``kstep.inject_hyperparams`` with no ``static_args``, and both are run for a few jitted steps.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep
from kstep._src.hyperparams import static_arg_names

B, D, C = 8, 5, 3
LR = 0.05
WIDE_BAND = (1e-6, 1e6)  # every base LR passes the controller unchanged


def linear_apply(params, batch):
  return batch["x"] @ params["w"] + params["b"]


def loss_fn(params, batch):
  return 0.5 * jnp.mean(jnp.sum(jnp.square(linear_apply(params, batch) - batch["y"]), axis=-1))


def make_batch(seed):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(B, C)), jnp.float32)}


def init_params():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(D, C)) / np.sqrt(D), jnp.float32),
          "b": jnp.zeros((C,), jnp.float32)}


# name: (factory, keyword arguments). The trackers run after optax.sgd(LR).
FACTORIES = {
    "k_controlled_sgd": (kstep.k_controlled_sgd, dict(
        learning_rate=LR, apply_fn=linear_apply, batch_size=B,
        estimate=kstep.Estimate(every=2, num_probes=2, seed=3))),
    "track_k": (kstep.track_k, dict(
        apply_fn=linear_apply, learning_rate=LR, batch_size=B, every=2, num_probes=2, seed=3)),
    "track_lambda_max": (kstep.track_lambda_max, dict(
        loss_fn=loss_fn, every=2, num_iters=8, seed=3)),
    "track_batch_sharpness": (kstep.track_batch_sharpness, dict(
        loss_fn=loss_fn, every=2, learning_rate=LR)),
}


def build(name, inject, **overrides):
  factory, kwargs = FACTORIES[name]
  kwargs = {**kwargs, **overrides}
  t = (kstep.inject_hyperparams(factory) if inject else factory)(**kwargs)
  return t if name == "k_controlled_sgd" else optax.chain(optax.sgd(LR), t)


def injected_part(name, state):
  """The kstep transform's InjectHyperparamsState inside ``state``."""
  return state if name == "k_controlled_sgd" else state[1]


def without_injection(name, state):
  """``state`` with the injected wrapper replaced by its inner state (the plain tree)."""
  if name == "k_controlled_sgd":
    return state.inner_state
  return (state[0], state[1].inner_state)


def make_step(opt):
  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, updates

  return step


def run(opt, steps=3, params=None, state=None, first=0):
  params = init_params() if params is None else params
  state = opt.init(params) if state is None else state
  step = make_step(opt)
  for t in range(first, first + steps):
    params, state, updates = step(params, state, make_batch(t))
  assert step._cache_size() == 1
  return params, state, updates


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_injected_equals_plain_without_static_args(name):
  plain = run(build(name, inject=False))
  injected = run(build(name, inject=True))
  p_state, i_state = plain[1], without_injection(name, injected[1])
  assert jax.tree.structure(i_state) == jax.tree.structure(p_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               (injected[0], injected[2], i_state), (plain[0], plain[2], p_state))
  hyperparams = injected_part(name, injected[1]).hyperparams
  factory, kwargs = FACTORIES[name]
  assert not set(hyperparams) & static_arg_names(factory)
  assert ("learning_rate" in hyperparams) == ("learning_rate" in kwargs)
  assert all(jnp.issubdtype(v.dtype, jnp.floating) for v in hyperparams.values())


def test_static_args_are_derived_from_the_signatures():
  for name, (factory, _) in FACTORIES.items():
    static = static_arg_names(factory)
    params = inspect.signature(factory).parameters
    for arg in ("apply_fn", "loss_fn", "loss", "num_probes", "num_iters", "batch_size", "seed",
                "every", "axis_name", "estimator", "output_norm", "probe_scope", "method",
                "estimate", "guard", "decay_steps"):
      assert (arg in static) == (arg in params), (name, arg)
    for arg in ("learning_rate", "momentum", "weight_decay", "decay", "tol", "smoothing",
                "max_change", "max_scale", "trace_floor"):
      assert arg not in static, (name, arg)
  # A Python zero momentum drops the controller's momentum part: static, so the trees match.
  args = lambda m: dict(inspect.signature(kstep.k_controlled_sgd).bind(
      0.1, apply_fn=linear_apply, momentum=m).arguments)
  assert "momentum" in static_arg_names(kstep.k_controlled_sgd, args(0.0))
  assert "momentum" not in static_arg_names(kstep.k_controlled_sgd, args(0.9))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_controller_state_tree_matches_plain_for_either_momentum(momentum):
  plain = build("k_controlled_sgd", inject=False, momentum=momentum)
  injected = build("k_controlled_sgd", inject=True, momentum=momentum)
  params = init_params()
  assert (jax.tree.structure(injected.init(params).inner_state)
          == jax.tree.structure(plain.init(params)))
  assert ("momentum" in injected.init(params).hyperparams) == (momentum != 0.0)


@pytest.mark.slow
def test_injected_learning_rate_changes_the_controller_step():
  """With a band every LR passes, the step is η·g (momentum 0): doubling the injected η doubles
  the update and K (K ∝ η)."""
  kw = dict(momentum=0.0, target=WIDE_BAND)
  opt = build("k_controlled_sgd", inject=True, **kw)
  params, state, _ = run(opt, steps=2)  # estimates at step 0
  _, _, plain_updates = run(build("k_controlled_sgd", inject=False, **kw), steps=3)
  step = make_step(opt)
  _, same, updates = step(params, state, make_batch(2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, plain_updates)
  state.hyperparams["learning_rate"] = jnp.asarray(2 * LR, jnp.float32)
  _, doubled, updates2 = step(params, state, make_batch(2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 2 * b, rtol=1e-6), updates2, updates)
  k, k2 = float(kstep.stats(same)["k"]), float(kstep.stats(doubled)["k"])
  assert k > 0
  np.testing.assert_allclose(k2, 2 * k, rtol=1e-6)
  assert step._cache_size() == 1


def test_injected_learning_rate_changes_track_k():
  opt = build("track_k", inject=True)
  params, state, _ = run(opt, steps=2)  # measured at step 0
  step = make_step(opt)
  _, same, _ = step(params, state, make_batch(2))  # measures again at step 2
  state[1].hyperparams["learning_rate"] = jnp.asarray(3 * LR, jnp.float32)
  _, tripled, _ = step(params, state, make_batch(2))
  k, k3 = float(kstep.stats(same)["k"]), float(kstep.stats(tripled)["k"])
  assert k > 0
  np.testing.assert_allclose(k3, 3 * k, rtol=1e-5)


def test_works_for_optax_factories():
  params = {"w": jnp.ones((4, 3)), "v": jnp.ones((3,))}
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  # adafactor needs min_dim_size_to_factor static under optax.inject_hyperparams: listed for you.
  for factory, kwargs in ((optax.adafactor, dict(learning_rate=0.1)),
                          (optax.sgd, dict(learning_rate=0.1, momentum=0.9))):
    plain, opt = factory(**kwargs), kstep.inject_hyperparams(factory)(**kwargs)
    u_plain, s_plain = jax.jit(plain.update)(grads, plain.init(params), params)
    u_inj, s_inj = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u_inj, u_plain)
    assert jax.tree.structure(s_inj.inner_state) == jax.tree.structure(s_plain)
    assert "learning_rate" in s_inj.hyperparams
  assert set(kstep.inject_hyperparams(optax.sgd)(0.1, momentum=0.9).init(params).hyperparams) \
      == set(optax.inject_hyperparams(optax.sgd)(0.1, momentum=0.9).init(params).hyperparams)


def test_extra_static_args_and_unknown_names():
  opt = kstep.inject_hyperparams(kstep.track_k, static_args="momentum")(
      linear_apply, learning_rate=LR, momentum=0.5)
  assert set(opt.init(init_params()).hyperparams) == {"learning_rate", "decay"}
  with pytest.raises(ValueError, match="not arguments of track_k"):
    kstep.inject_hyperparams(kstep.track_k, static_args=("apply_fns",))
