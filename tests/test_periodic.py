"""kstep._src.periodic: the periodic estimates' predicate, and where XLA schedules their cond."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep
from kstep._src import periodic


@pytest.mark.parametrize("every", [1, 3, 10])
def test_due_is_count_mod_every(every):
  updates = {"w": jnp.ones((2, 3)), "b": jnp.zeros((0,)), "s": jnp.float32(2.0)}
  due = jax.jit(lambda c, u: periodic.due(c, every, u))
  got = [bool(due(jnp.int32(c), updates)) for c in range(25)]
  assert got == [c % every == 0 for c in range(25)]


def test_due_ignores_bad_numbers_and_empty_updates():
  # NaN/Inf updates never trigger an estimate between multiples, nor block one at a multiple.
  for bad in (jnp.nan, jnp.inf):
    updates = {"w": jnp.full((4,), bad), "v": jnp.ones((2,), jnp.bfloat16)}
    assert not bool(periodic.due(jnp.int32(3), 10, updates))
    assert bool(periodic.due(jnp.int32(30), 10, updates))
  assert bool(periodic.due(jnp.int32(0), 10, {})) and not bool(periodic.due(jnp.int32(1), 10, ()))


def _entry_lines(hlo_text):
  entry = hlo_text[hlo_text.index("\nENTRY "):]
  return entry[:entry.index("\n}")].splitlines()


def _mlp():
  rng = np.random.default_rng(0)
  params = {f"w{i}": jnp.asarray(rng.normal(size=(16, 16)) / 4, jnp.float32) for i in range(3)}
  apply_fn = lambda p, b: jnp.tanh(jnp.tanh(b["x"] @ p["w0"]) @ p["w1"]) @ p["w2"]
  batch = {"x": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)}
  loss = lambda p, b: 0.5 * jnp.mean(jnp.sum(jnp.square(apply_fn(p, b) - b["y"]), -1))
  return params, apply_fn, batch, loss


OPTIMIZERS = {
    "k_controlled_sgd": lambda apply_fn, loss: kstep.k_controlled_sgd(
        0.1, apply_fn=apply_fn, estimate=kstep.Estimate(every=10)),
    "track_k": lambda apply_fn, loss: optax.chain(
        kstep.track_k(apply_fn, learning_rate=0.1, every=10), optax.sgd(0.1)),
    "track_lambda_max": lambda apply_fn, loss: optax.chain(
        kstep.track_lambda_max(loss, every=10, num_iters=3), optax.sgd(0.1)),
    "track_batch_sharpness": lambda apply_fn, loss: optax.chain(
        kstep.track_batch_sharpness(loss, every=10), optax.sgd(0.1)),
}


def _compiled_step_lines(name, donate=False):
  """The entry computation of one compiled training step of the 16x16 MLP with ``name``."""
  params, apply_fn, batch, loss = _mlp()
  opt = OPTIMIZERS[name](apply_fn, loss)

  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  return _entry_lines(jitted.lower(params, opt.init(params), batch).compile().as_text())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_periodic_cond_is_scheduled_after_the_gradients(name):
  # Checked on the compiled (scheduled) HLO of a training step: every weight gradient (16 x 16
  # matrix products: plain dots or the matmul library's custom fusions) comes before the cond.
  # Without periodic.due XLA:CPU placed the cond after the first layer's forward pass, and
  # lax.optimization_barrier (tried first) is removed from the optimised HLO.
  lines = _compiled_step_lines(name)
  conds = [i for i, line in enumerate(lines) if " conditional(" in line]
  dots = [i for i, line in enumerate(lines) if re.search(r"= f32\[16,16\]\S* dot\(", line)
          or re.search(r"= f32\[16,16\]\S* fusion\(.*kind=kCustom", line)]
  assert len(conds) == 1 and len(dots) >= 3
  assert max(dots) < conds[0], (max(dots), conds[0])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_idle_step_copies_no_parameter_sized_array_with_donated_state(name):
  # Between estimates the cond's other branch passes the state through. With params and state
  # donated, nothing parameter-sized (16 x 16) is copied: the guard's vector stays in place, and
  # a tracker's updates wait for its cond (periodic.release); without that tie XLA copies the
  # params for the cond. Without donation every output is a new buffer: the vector's one copy
  # per step.
  def copies(donate):
    return [line for line in _compiled_step_lines(name, donate)
            if re.search(r"= f32\[16,16\]\S* copy\(", line)]

  assert copies(donate=True) == []
  if name in ("k_controlled_sgd", "track_lambda_max"):  # hold a vector: the test can fail
    assert copies(donate=False)
