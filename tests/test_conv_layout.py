"""Convolutions in the canonical order inside control flow (kstep._src.conv_layout).

References: ``lax.conv_general_dilated`` itself and the unrewritten function (same values), and
the compiled HLO (every convolution in the ``b01f_01io->b01f`` order XLA:CPU runs fast).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep
from kstep._src import conv_layout

CANONICAL = "b01f_01io->b01f"


def conv_labels(compiled_text: str) -> list[str]:
  return re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", compiled_text)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.Conv(16, (3, 3), strides=(2, 2))(x)
    x = nn.gelu(nn.LayerNorm()(x))
    x = nn.Conv(16, (3, 3), kernel_dilation=(2, 2))(x)
    return nn.Dense(3)(x.mean((1, 2)))


@pytest.fixture(scope="module")
def net():
  model = ConvNet()
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  params = model.init(jax.random.key(1), x)["params"]
  apply_fn = lambda p, b: model.apply({"params": p}, b["x"])
  return apply_fn, params, {"x": x, "y": jax.random.normal(jax.random.key(2), (6, 3))}


@pytest.mark.parametrize("dims", [("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC"),
                                  ("NHWC", "OIHW", "NCHW"), ("CHWN", "IOHW", "HWNC")])
@pytest.mark.parametrize("groups", [(1, 1), (2, 1), (1, 2)])
def test_canonical_conv_equals_lax(dims, groups):
  feature_groups, batch_groups = groups
  lhs_spec, rhs_spec, out_spec = dims
  n, c, o, h = 4, 4, 6, 7
  rng = np.random.default_rng(0)
  lhs_shape = {"N": n, "C": c, "H": h, "W": h + 1}
  rhs_shape = {"O": o, "I": c // feature_groups, "H": 3, "W": 2}
  lhs = jnp.asarray(rng.normal(size=[lhs_shape[d] for d in lhs_spec]), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=[rhs_shape[d] for d in rhs_spec]), jnp.float32)
  kw = dict(window_strides=(2, 1), padding=((1, 2), (0, 1)), lhs_dilation=(1, 2),
            rhs_dilation=(2, 1), dimension_numbers=dims, feature_group_count=feature_groups,
            batch_group_count=batch_groups)
  conv = lambda l, r: jax.lax.conv_general_dilated(l, r, **kw)
  ref = conv(lhs, rhs)
  got = conv_layout.canonical_convs(conv, force=True)(lhs, rhs)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _vjp(apply_fn):
  def f(p, b):
    out, pull = jax.vjp(lambda q: apply_fn(q, b), p)
    return pull(out - b["y"])[0]
  return f


def test_vjp_inside_cond_equals_and_compiles_canonical(net):
  apply_fn, params, batch = net
  f = _vjp(apply_fn)
  zero = lambda p, b: jax.tree.map(jnp.zeros_like, p)
  plain = jax.jit(lambda p, b, t: jax.lax.cond(t, f, zero, p, b))
  rewritten = jax.jit(lambda p, b, t: jax.lax.cond(
      t, conv_layout.canonical_convs(f, force=True), zero, p, b))
  ref, got = plain(params, batch, True), rewritten(params, batch, True)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  before = conv_labels(plain.lower(params, batch, True).compile().as_text())
  after = conv_labels(rewritten.lower(params, batch, True).compile().as_text())
  entry = set(conv_labels(jax.jit(f).lower(params, batch).compile().as_text()))
  # In the entry computation XLA brings every convolution into its fast forms; inside the cond
  # it does not, and the rewrite does it there.
  assert set(before) - entry
  assert set(after) <= entry and CANONICAL in after


def test_rewrite_recurses_into_control_flow_and_calls(net):
  apply_fn, params, batch = net
  f = _vjp(apply_fn)

  def g(p, b):
    # fori_loop with static bounds (a scan), a while loop, a nested cond, a nested jit and a
    # checkpoint, each around a VJP through the convolutions.
    s = jax.lax.fori_loop(0, 2, lambda i, acc: jax.tree.map(jnp.add, acc, f(p, b)),
                          jax.tree.map(jnp.zeros_like, p))
    n = jnp.sum(b["y"] > 10).astype(jnp.int32) + 1  # a dynamic trip count (1)
    w = jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, f(p, b)),
                           (0, jax.tree.map(jnp.zeros_like, p)))[1]
    c = jax.lax.cond(n > 0, f, lambda p, b: jax.tree.map(jnp.zeros_like, p), p, b)
    j = jax.jit(jax.checkpoint(f))(p, b)
    return s, w, c, j

  ref = jax.jit(g)(params, batch)
  h = jax.jit(conv_layout.canonical_convs(g, force=True))
  got = h(params, batch)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  entry = set(conv_labels(jax.jit(f).lower(params, batch).compile().as_text()))
  assert set(conv_labels(h.lower(params, batch).compile().as_text())) <= entry


def test_without_convolutions_the_function_is_unchanged():
  f = lambda x: jnp.sin(x) @ x.T
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(conv_layout.canonical_convs(f, force=True)(x), f(x))
  assert conv_layout.canonical_convs(f) is f or conv_layout.enabled()


@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_controller_step_compiles_only_canonical_convolutions(net, loss):
  """The K controller's update on a conv net: every convolution of the compiled step (the
  training step's and the estimate branches') is in a form XLA:CPU gives the training step."""
  if not conv_layout.enabled():
    pytest.skip("the rewrite applies on CPU")
  apply_fn, params, batch = net
  opt = kstep.k_controlled_sgd(0.1, apply_fn=apply_fn, loss=loss)
  loss_fn = lambda p, b: 0.5 * jnp.mean(jnp.sum((apply_fn(p, b) - b["y"]) ** 2, -1))

  @jax.jit
  def step(p, s, b):
    updates, s = opt.update(jax.grad(loss_fn)(p, b), s, p, batch=b)
    return optax.apply_updates(p, updates), s

  state = opt.init(params)
  labels = conv_labels(step.lower(params, state, batch).compile().as_text())
  entry = set(conv_labels(jax.jit(jax.grad(loss_fn)).lower(params, batch).compile().as_text()))
  assert len(labels) > 10 and set(labels) <= entry
  p, s = step(params, state, batch)
  assert np.isfinite(float(kstep.stats(s)["k_trace"]))
