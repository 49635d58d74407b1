"""kstep with flax NNX: `nnx.Optimizer` around k_controlled_sgd, the batch passed through.

`nnx.Optimizer.update(model, grads, **kwargs)` forwards keyword arguments to the optax update,
so `batch=batch` reaches the K controller. The controller evaluates the model on the pure
parameter state it is given, through `apply_fn(params, batch)` built with `nnx.merge`.

    python examples/nnx_quickstart.py
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.datasets import load_digits

import kstep


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, hidden: int = 128):
    self.l1 = nnx.Linear(64, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.l3 = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--learning-rate", type=float, default=3.0, help="base learning rate")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args()

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

  model = MLP(nnx.Rngs(0))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(params, batch):
    return nnx.merge(graphdef, params, rest)(batch["x"])

  tx = kstep.k_controlled_sgd(
      args.learning_rate, apply_fn=apply_fn, loss="mse", decay_steps=args.steps
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model, batch):
    targets = jax.nn.one_hot(batch["y"], 10)
    return 0.5 * jnp.mean(jnp.sum((model(batch["x"]) - targets) ** 2, axis=-1))

  @nnx.jit
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads, batch=batch)  # the batch the gradients came from
    return loss

  rng = np.random.default_rng(1)
  for t in range(args.steps):
    idx = rng.choice(len(x_train), args.batch_size, replace=False)
    loss = train_step(model, optimizer, {"x": x_train[idx], "y": y_train[idx]})
    if t % 200 == 0 or t == args.steps - 1:
      s = jax.device_get(kstep.stats(optimizer.opt_state))  # plain arrays, NNX state or not
      print(f"step {t:5d}  loss {float(loss):.4f}  K per output {s['k']:.3f}  "
            f"lr {s['k_learning_rate']:.4g}")
  accuracy = jnp.mean(jnp.argmax(model(x_test), -1) == y_test)
  print(f"test accuracy {float(accuracy):.3f}")


if __name__ == "__main__":
  main()
