"""kstep in a flax-example-style loop: ``TrainState``, a BatchNorm CNN, ``mutable=["batch_stats"]``.

The loop is flax's usual one; two lines differ: the state is ``kstep.flax.TrainState`` (its
``apply_gradients`` takes ``batch=``) and the optimizer is ``kstep.k_controlled_sgd`` with the
``apply_fn`` kstep linearises (``docs/batchnorm.md`` says which one and why).

    python examples/flax_trainstate.py            # digits, 8x8 images, CPU, ~30 s
"""

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import kstep
from kstep.flax import TrainState


class CNN(nn.Module):
  """Conv–BatchNorm–ReLU twice, global average pooling, a linear read-out."""

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (16, 32):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class State(TrainState):
  batch_stats: Any


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--learning-rate", type=float, default=3.0, help="base LR (on purpose large)")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--batch-size", type=int, default=64)
  args = p.parse_args(argv)

  digits = load_digits()
  x = (digits.images / 16.0 - 0.5).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
  y = digits.target.astype(np.int32)
  x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

  model = CNN()
  variables = model.init(jax.random.PRNGKey(0), x_train[:2], train=False)

  def kstep_apply(params, batch):  # train mode on the rows kstep is given (docs/batchnorm.md)
    return model.apply({"params": params}, batch["x"], train=True, mutable=["batch_stats"])[0]

  state = State.create(
      apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
      tx=kstep.k_controlled_sgd(args.learning_rate, apply_fn=kstep_apply,
                                loss="softmax_cross_entropy", decay_steps=args.steps))

  @jax.jit
  def train_step(state, batch):
    def loss_fn(params):
      logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                       batch["x"], train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
      return loss, updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch=batch, batch_stats=updates["batch_stats"])
    return state, loss

  @jax.jit
  def accuracy(state, x, y):
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                            train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  rng = np.random.default_rng(0)
  for t in range(args.steps):
    idx = rng.choice(len(x_train), args.batch_size, replace=False)
    state, loss = train_step(state, {"x": x_train[idx], "y": y_train[idx]})
    if t % 100 == 0 or t == args.steps - 1:
      s = kstep.stats(state.opt_state)
      print(f"step {t:4d}  loss {float(loss):.4f}  K {float(s['k']):.3f}  "
            f"lr {float(s['k_learning_rate']):.4g} (base {args.learning_rate:g})")
  acc = float(accuracy(state, x_test, y_test))
  print(f"test accuracy {acc:.3f}")
  return acc


if __name__ == "__main__":
  main()
