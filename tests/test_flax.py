"""kstep.flax.TrainState: flax's TrainState whose apply_gradients forwards ``batch`` (and the
fused path's ``probe``) to kstep. References: the same step written by hand with ``tx.update``
and ``optax.apply_updates`` (bitwise), and flax's own TrainState (which forwards nothing)."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep

nn = pytest.importorskip("flax.linen")
from flax.training import train_state  # noqa: E402

from kstep.flax import TrainState  # noqa: E402


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))


class State(TrainState):
  batch_stats: Any


MODEL = CNN()
RNG = np.random.default_rng(0)
BATCHES = [{"x": jnp.asarray(RNG.normal(size=(16, 4, 4, 1)), jnp.float32),
            "y": jnp.asarray(RNG.integers(0, 3, size=16), jnp.int32)} for _ in range(4)]


def kstep_apply(params, batch):
  return MODEL.apply({"params": params}, batch["x"], train=True, mutable=["batch_stats"])[0]


def make_state(cls=State, tx=None):
  variables = MODEL.init(jax.random.PRNGKey(0), BATCHES[0]["x"], train=False)
  tx = tx or kstep.k_controlled_sgd(1.0, apply_fn=kstep_apply, loss="softmax_cross_entropy",
                                    estimate=kstep.Estimate(every=2))
  state = cls.create(apply_fn=MODEL.apply, params=variables["params"],
                     batch_stats=variables["batch_stats"], tx=tx)
  return state.replace(step=jnp.zeros((), jnp.int32))  # as after a step: one compile


def loss_and_grads(state, batch):
  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     batch["x"], train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), updates
  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, updates["batch_stats"], grads


def train_step(state, batch):
  loss, stats, grads = loss_and_grads(state, batch)
  return state.apply_gradients(grads=grads, batch=batch, batch_stats=stats), loss


def by_hand(state, batch):
  loss, stats, grads = loss_and_grads(state, batch)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, batch=batch)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state, batch_stats=stats), loss


def test_flax_example_loop_with_batchnorm_matches_the_step_by_hand():
  both = jax.jit(lambda a, b, batch: (train_step(a, batch), by_hand(b, batch)))  # one compile
  a = b = make_state()
  for batch in BATCHES:
    (a, loss_a), (b, loss_b) = both(a, b, batch)
    assert float(loss_a) == float(loss_b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  s = kstep.stats(a.opt_state)
  assert int(a.step) == 4 and int(s["k_num_estimates"]) == 2 and np.isfinite(float(s["k"]))
  initial = make_state().batch_stats
  moved = jax.tree.map(lambda u, v: bool(jnp.any(u != v)), a.batch_stats, initial)
  assert all(jax.tree.leaves(moved))  # the running statistics were updated


def test_flax_trainstate_without_batch_names_the_way_out():
  plain = make_state(cls=type("Plain", (train_state.TrainState,), {"__annotations__": {
      "batch_stats": Any}}))
  _, _, grads = loss_and_grads(plain, BATCHES[0])
  with pytest.raises(ValueError, match="kstep.flax.TrainState"):
    plain.apply_gradients(grads=grads)


def test_probe_is_forwarded_to_the_fused_update():
  dense = nn.Dense(3)
  apply_fn = lambda p, batch: dense.apply({"params": p}, batch["x"].reshape(16, -1))
  params = dense.init(jax.random.PRNGKey(0), jnp.zeros((1, 16)))["params"]
  state = TrainState.create(apply_fn=dense.apply, params=params,
                            tx=kstep.k_controlled_sgd(1.0, apply_fn=apply_fn))
  per_example = lambda out, batch: 0.5 * jnp.sum(jnp.square(out), axis=-1)
  grad_fn = kstep.value_and_grad(per_example, apply_fn)
  batch = BATCHES[0]

  @jax.jit
  def both(state):
    (_, probe), grads = grad_fn(state.params, batch, state=state.opt_state)
    fused = state.apply_gradients(grads=grads, batch=batch, probe=probe)
    _, opt_state = state.tx.update(grads, state.opt_state, state.params, batch=batch,
                                   probe=probe)
    return fused.opt_state, opt_state, grads

  fused, by_hand, grads = both(state)
  np.testing.assert_array_equal(np.asarray(kstep.stats(fused)["k"]),
                                np.asarray(kstep.stats(by_hand)["k"]))
  assert np.isfinite(float(kstep.stats(fused)["k"]))
  with pytest.raises(ValueError, match="value_and_grad"):
    state.apply_gradients(grads=grads, batch=BATCHES[0], probe={"trace": 1.0})


@pytest.mark.slow
def test_trainstate_example_trains_a_batchnorm_cnn_at_base_lr_3():
  """examples/flax_trainstate.py: digits, BatchNorm CNN, base LR 3 (far above SGD's edge)."""
  pytest.importorskip("sklearn")
  from conftest import load_example

  assert load_example("flax_trainstate").main([]) > 0.93
