"""Tests of kstep._src.losses: output Hessians, probe samplers and callable losses.

References: ``jax.hessian`` of the per-example losses as optax writes them (so the conventions,
e.g. the ½ in MSE, are those of the loss actually used), closed forms in NumPy, and the empirical
moments of many probes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kstep._src import losses

B, C = 4, 3
NAMED = list(losses.LOSS_NAMES)


def make_data(seed=0):
  rng = np.random.default_rng(seed)
  # Logits spread enough that the softmax and the sigmoids are far from uniform.
  outputs = jnp.asarray(2.0 * rng.normal(size=(B, C)), jnp.float32)
  batch = {
      "y": jnp.asarray(rng.normal(size=(B, C)), jnp.float32),
      "label": jnp.asarray(rng.integers(0, C, size=(B,)), jnp.int32),
      "target": jnp.asarray(rng.integers(0, 2, size=(B, C)), jnp.float32),
  }
  return outputs, batch


# Per-example losses as a user would write them with optax: (outputs (C,), example) -> scalar.
OPTAX_LOSSES = {
    "mse": lambda o, ex: 0.5 * jnp.sum(optax.squared_error(o, ex["y"])),
    "softmax_cross_entropy":
        lambda o, ex: optax.softmax_cross_entropy_with_integer_labels(o, ex["label"]),
    "sigmoid_binary_cross_entropy":
        lambda o, ex: jnp.sum(optax.sigmoid_binary_cross_entropy(o, ex["target"])),
}


@functools.partial(jax.jit, static_argnums=0)
def per_example_hessians(fn, outputs, batch):
  """Reference H_i = ∂²ℓ(o_i, example_i)/∂o_i², one example at a time (B, C, C)."""
  return jax.vmap(jax.hessian(fn))(outputs, batch)


def closed_form(name, outputs):
  o = np.asarray(outputs, np.float64)
  if name == "mse":
    return np.broadcast_to(np.eye(C), (B, C, C))
  if name == "softmax_cross_entropy":
    p = np.exp(o - o.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.stack([np.diag(q) - np.outer(q, q) for q in p])
  s = 1.0 / (1.0 + np.exp(-o))
  return np.stack([np.diag(q * (1 - q)) for q in s])


@pytest.mark.parametrize("name", NAMED)
def test_named_hessian_is_the_hessian_of_the_optax_loss(name):
  outputs, batch = make_data()
  spec = losses.resolve_loss(name)
  assert spec.per_example is None and spec.noise is not None
  h = jax.jit(spec.hessian)(outputs, batch)
  assert h.shape == (B, C, C) and h.dtype == jnp.float32
  ref = per_example_hessians(OPTAX_LOSSES[name], outputs, batch)
  np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h, closed_form(name, outputs), rtol=1e-5, atol=1e-6)
  # The named losses' output Hessians do not depend on the labels.
  _, other = make_data(seed=1)
  np.testing.assert_allclose(jax.jit(spec.hessian)(outputs, other), h, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMED)
def test_named_gnvp_is_hessian_times_vector(name):
  outputs, batch = make_data()
  w = jnp.asarray(np.random.default_rng(2).normal(size=(B, C)), jnp.float32)
  spec = losses.resolve_loss(name)
  ref = np.einsum("bcd,bd->bc", closed_form(name, outputs), np.asarray(w, np.float64))
  np.testing.assert_allclose(jax.jit(spec.gnvp)(outputs, batch, w), ref, rtol=1e-5, atol=1e-6)
  assert spec.for_output_shape((B, C)) is spec


NUM_SAMPLES = 20000


@pytest.fixture(scope="module")
def samples():
  """NUM_SAMPLES probes of every named sampler at the same outputs: {name: (K, B, C)}."""
  outputs, batch = make_data()
  keys = jax.random.split(jax.random.PRNGKey(0), NUM_SAMPLES)
  specs = {name: losses.resolve_loss(name) for name in NAMED}
  draw = jax.jit(jax.vmap(lambda k: {n: s.sample(k, outputs, batch) for n, s in specs.items()}))
  return {n: np.asarray(u, np.float64) for n, u in draw(keys).items()}


def assert_close_in_standard_errors(samples, expected, n_se=5.0):
  """Sample mean along axis 0 equals ``expected`` within n_se standard errors (elementwise)."""
  mean = samples.mean(0)
  se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
  bad = np.abs(mean - expected) > n_se * se + 1e-9
  assert not np.any(bad), (mean[bad], np.asarray(expected)[bad], se[bad])


@pytest.mark.parametrize("name", NAMED)
def test_sampler_moments(name, samples):
  outputs, _ = make_data()
  u = samples[name]
  assert u.shape == (NUM_SAMPLES, B, C)
  h = closed_form(name, outputs)
  # E[u_i] = 0 and E[u_i u_iᵀ] = H_i: the sampled-label construction is unbiased for H.
  assert_close_in_standard_errors(u, np.zeros((B, C)))
  outer = np.einsum("kbc,kbd->kbcd", u, u)
  assert_close_in_standard_errors(outer, h)
  # Independent across examples: E[u_i u_jᵀ] = 0 for i ≠ j.
  cross = np.einsum("kc,kd->kcd", u[:, 0], u[:, 1])
  assert_close_in_standard_errors(cross, np.zeros((C, C)))
  # The test can see a wrong Hessian: the standard errors are far below the entries of H.
  se = outer.std(0, ddof=1) / np.sqrt(NUM_SAMPLES)
  assert np.max(se) < 0.02 * np.max(np.abs(h))


def test_sampler_supports(samples):
  outputs, _ = make_data()
  samples_ = {n: u[:500] for n, u in samples.items()}
  # MSE: Rademacher signs.
  assert set(np.unique(samples_["mse"])) == {-1.0, 1.0}
  # Softmax: u = p − e_ŷ, so p − u is a one-hot label.
  p = jax.nn.softmax(outputs, axis=-1)
  onehot = np.asarray(p - samples_["softmax_cross_entropy"])
  np.testing.assert_allclose(np.round(onehot), onehot, atol=1e-6)
  np.testing.assert_allclose(onehot.sum(-1), 1.0, atol=1e-6)
  # Sigmoid: u = s − y with y ∈ {0, 1} drawn per output.
  s = jax.nn.sigmoid(outputs)
  y = np.asarray(s - samples_["sigmoid_binary_cross_entropy"])
  np.testing.assert_allclose(np.round(y), y, atol=1e-6)
  assert set(np.unique(np.round(y))) == {0.0, 1.0}


@pytest.mark.parametrize("name", NAMED)
def test_bf16_outputs_give_float32(name):
  outputs, batch = make_data()
  spec = losses.resolve_loss(name)
  o16 = outputs.astype(jnp.bfloat16)
  h = jax.jit(spec.hessian)(o16, batch)
  u = jax.jit(spec.sample)(jax.random.PRNGKey(0), o16, batch)
  assert h.dtype == jnp.float32 and u.dtype == jnp.float32
  ref = closed_form(name, np.asarray(o16.astype(jnp.float32)))
  np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Callable losses.
# --------------------------------------------------------------------------------------------


def coupled_loss(outputs, batch):
  """Per-example losses (B,) whose output Hessians are dense and depend on the outputs."""
  ce = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"])
  return ce + 0.3 * outputs[:, 0] * outputs[:, 1] ** 2 + jnp.sum(jnp.sin(outputs) * batch["y"], -1)


def test_callable_hessian_matches_per_example_jax_hessian():
  outputs, batch = make_data()
  spec = losses.resolve_loss(coupled_loss)
  assert spec.noise is None and spec.per_example is coupled_loss
  assert spec.name == "coupled_loss"
  h = jax.jit(spec.hessian)(outputs, batch)
  assert h.shape == (B, C, C) and h.dtype == jnp.float32

  def one(o, ex):  # the same loss on a single example
    single = jax.tree.map(lambda x: x[None], ex)
    return coupled_loss(o[None], single)[0]

  ref = per_example_hessians(one, outputs, batch)
  assert np.max(np.abs(ref - np.diagonal(ref, axis1=1, axis2=2)[..., None] * np.eye(C))) > 0.1
  np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)


def test_callable_gnvp_matches_hessian_product():
  outputs, batch = make_data()
  spec = losses.resolve_loss(coupled_loss)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(B, C)), jnp.float32)
  ref = jnp.einsum("bcd,bd->bc", jax.jit(spec.hessian)(outputs, batch), w)
  np.testing.assert_allclose(jax.jit(spec.gnvp)(outputs, batch, w), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"])
def test_callable_written_like_a_named_loss_has_its_hessian(name):
  outputs, batch = make_data()
  fn = jax.vmap(OPTAX_LOSSES[name])  # (outputs (B, C), batch) -> (B,)
  h = jax.jit(losses.resolve_loss(fn).hessian)(outputs, batch)
  np.testing.assert_allclose(h, closed_form(name, outputs), rtol=1e-5, atol=1e-6)


def test_callable_loss_scaling_conventions():
  outputs, batch = make_data()
  mean_over_classes = lambda o, b: 0.5 * jnp.mean((o - b["y"]) ** 2, -1)
  without_half = lambda o, b: jnp.sum((o - b["y"]) ** 2, -1)
  eye = np.broadcast_to(np.eye(C), (B, C, C))
  hessian = lambda fn: jax.jit(losses.resolve_loss(fn).hessian)(outputs, batch)
  np.testing.assert_allclose(hessian(mean_over_classes), eye / C, rtol=1e-6)
  np.testing.assert_allclose(hessian(without_half), 2 * eye, rtol=1e-6)


def test_callable_for_scalar_outputs_sees_the_model_shape():
  rng = np.random.default_rng(4)
  outputs = jnp.asarray(rng.normal(size=(B,)), jnp.float32)
  batch = {"t": jnp.asarray(rng.integers(0, 2, size=(B,)), jnp.float32)}
  shapes = []

  def bce(o, b):
    shapes.append(o.shape)
    return optax.sigmoid_binary_cross_entropy(o, b["t"])

  spec = losses.resolve_loss(bce).for_output_shape((B,))
  h = jax.jit(spec.hessian)(outputs.reshape(B, 1), batch)
  assert h.shape == (B, 1, 1)
  s = 1.0 / (1.0 + np.exp(-np.asarray(outputs, np.float64)))
  np.testing.assert_allclose(h[:, 0, 0], s * (1 - s), rtol=1e-5)
  w = jnp.asarray(rng.normal(size=(B, 1)), jnp.float32)
  np.testing.assert_allclose(jax.jit(spec.gnvp)(outputs.reshape(B, 1), batch, w)[:, 0],
                             s * (1 - s) * np.asarray(w[:, 0]), rtol=1e-5)
  assert shapes and all(shape == (B,) for shape in shapes)


def test_callable_hessian_with_bf16_outputs_is_float32():
  outputs, batch = make_data()
  h = jax.jit(losses.resolve_loss(coupled_loss).hessian)(outputs.astype(jnp.bfloat16), batch)
  assert h.dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# resolve_loss.
# --------------------------------------------------------------------------------------------


def test_resolve_loss_rejects_bad_input():
  with pytest.raises(ValueError, match="`loss`.*hinge"):
    losses.resolve_loss("hinge")
  with pytest.raises(ValueError, match="`loss`.*int"):
    losses.resolve_loss(3)
  with pytest.raises(ValueError, match="`objective`"):
    losses.resolve_loss("MSE", argname="objective")


def test_resolve_loss_passes_output_losses_through():
  spec = losses.resolve_loss("softmax_cross_entropy")
  assert spec.name == "softmax_cross_entropy"
  assert losses.resolve_loss(spec) is spec


def test_softmax_cross_entropy_on_sequence_outputs_makes_every_position_a_row():
  """(B, T, V) logits are B·T rows of V: the trace is the mean per-position GN trace."""
  from control_helpers import dense_per_token_trace, sequence_model

  import kstep

  apply_fn, params, batch = sequence_model()
  ref = dense_per_token_trace(apply_fn, params, batch)
  exact = kstep.gauss_newton_trace(apply_fn, params, batch, loss="softmax_cross_entropy",
                                   method="exact")
  np.testing.assert_allclose(float(exact.value), ref, rtol=1e-5)
  hutch = kstep.gauss_newton_trace(apply_fn, params, batch, loss="softmax_cross_entropy",
                                   key=jax.random.key(5), num_probes=4000, chunk_size=500)
  assert abs(float(hutch.value) - ref) < 4 * float(hutch.stderr)
  assert float(hutch.stderr) < 0.02 * ref
  # A callable loss summing a sequence's positions sees one example of T·V outputs: its trace
  # per sequence is T times the per-position trace.
  seq_ce = lambda out, b: -jnp.sum(jax.nn.log_softmax(out)[..., 0], axis=-1)
  summed = kstep.gauss_newton_trace(apply_fn, params, batch, loss=seq_ce, method="exact")
  np.testing.assert_allclose(float(summed.value), 4 * ref, rtol=1e-5)


def test_rows_per_example():
  ce, mse = losses.resolve_loss("softmax_cross_entropy"), losses.resolve_loss("mse")
  assert losses.rows_per_example(ce, (8, 16, 256)) == 16
  assert losses.rows_per_example(ce, (8, 4, 3, 10)) == 12
  assert losses.rows_per_example(ce, (8, 10)) == 1
  assert losses.rows_per_example(mse, (8, 16, 256)) == 1  # MSE: one example of T·C outputs
  assert losses.rows_per_example(None, (8, 16, 256)) == 1
