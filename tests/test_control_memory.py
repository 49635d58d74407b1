"""The controller's compiled step needs about the memory of the training step it sits in.

XLA:CPU allocates a compiled step's temporary buffer afresh at every call, and glibc maps an
allocation over 32 MiB anew each time, so memory a conditional branch adds to the step is paid
as page faults on every step, estimate or not (``docs/controller.md``, "Costs"). The first
estimate (8 probes on the whole batch, 20 power steps) would need 3-7x the step's memory on a
conv net run all at once; it runs its probes and power steps one at a time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kstep

B = 32


def conv_net(params, batch):
  x = batch["x"]
  for w in (params["c1"], params["c2"]):
    x = jax.nn.gelu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return jnp.mean(x, axis=(1, 2)) @ params["head"]


def _problem():
  rng = np.random.default_rng(0)
  params = {"c1": rng.normal(size=(3, 3, 3, 8)) / np.sqrt(27),
            "c2": rng.normal(size=(3, 3, 8, 8)) / np.sqrt(72),
            "head": rng.normal(size=(8, 10)) / 3}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  batch = {"x": jnp.asarray(rng.normal(size=(B, 8, 8, 3)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 10, B))}
  return params, batch


def _temp_bytes(opt, loss_name, params, batch):
  def loss_fn(p, b):
    out = conv_net(p, b)
    onehot = jax.nn.one_hot(b["y"], 10)
    if loss_name == "mse":
      return 0.5 * jnp.mean(jnp.sum((out - onehot) ** 2, -1))
    return jnp.mean(optax.softmax_cross_entropy(out, onehot))

  def step(p, s, b):
    updates, s = opt.update(jax.grad(loss_fn)(p, b), s, p, batch=b)
    return optax.apply_updates(p, updates), s

  compiled = jax.jit(step).lower(params, opt.init(params), batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("loss_name", ["mse", "softmax_cross_entropy"])
def test_controller_step_needs_about_the_sgd_steps_memory(loss_name):
  params, batch = _problem()
  sgd = _temp_bytes(optax.with_extra_args_support(optax.sgd(0.1, momentum=0.9)), loss_name,
                    params, batch)
  k = _temp_bytes(kstep.k_controlled_sgd(0.1, apply_fn=conv_net, loss=loss_name), loss_name,
                  params, batch)
  # The estimate's branches reuse the step's buffers. Here 1.16x (MSE) and 1.21x (CE: the trace
  # and the floor's probe, two VJPs); with the first estimate's probes all at once, 3.7x and
  # 5.1x.
  assert k <= 1.25 * sgd, (k, sgd)
