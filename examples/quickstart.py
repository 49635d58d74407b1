"""kstep quickstart: a flax MLP on scikit-learn's bundled digits, trained with k_controlled_sgd.

The base learning rate is deliberately far too large (10.0): plain SGD with it diverges at once.
The controller measures the noise kernel norm K on the first batch, moves the step into the band
(cross-entropy's default, K ∈ [0.7, 0.8] on the Gauss–Newton trace) before the first update, and
anneals the band to 0 over the run (``decay_steps``: the recipe for a run of known length), while
the curvature guard keeps η·λ_max below a quarter of its edge. ``--adam`` trains with
k_controlled_adam instead (AdamW, K_P of the kernel J P⁻¹ Jᵀ in (1.6, 6.4); its base LR 10 is as
far too large for Adam). Runs in well under a minute on a CPU:

    python examples/quickstart.py [--adam]
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import kstep


class MLP(nn.Module):
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def main(argv: list[str] | None = None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--learning-rate", type=float, default=10.0, help="base learning rate")
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--adam", action="store_true", help="kstep.k_controlled_adam (AdamW)")
  args = parser.parse_args(argv)

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

  model = MLP()
  params = model.init(jax.random.PRNGKey(0), x_train[:1])
  apply_fn = lambda p, batch: model.apply(p, batch["x"])  # outputs (B, 10)

  def loss_fn(p, batch):
    logits = apply_fn(p, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  controlled = kstep.k_controlled_adam if args.adam else kstep.k_controlled_sgd
  opt = controlled(
      args.learning_rate, apply_fn=apply_fn, loss="softmax_cross_entropy", decay_steps=args.steps
  )
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)  # pass the batch
    return optax.apply_updates(params, updates), state, loss

  print("K: noise kernel norm at the step taken (Gauss–Newton trace; edge near 1–2 for CE); "
        "lr: step taken (base LR in brackets); trace: per-example GN trace ± its standard error; "
        "η·λ/edge: curvature guard's sharpness ratio")
  rng = np.random.default_rng(1)
  for t in range(args.steps):
    idx = rng.choice(len(x_train), args.batch_size, replace=False)
    params, state, loss = step(params, state, {"x": x_train[idx], "y": y_train[idx]})
    if t % 150 == 0 or t == args.steps - 1:
      s = jax.device_get(kstep.stats(state))
      print(f"step {t:5d}  loss {float(loss):.4f}  K {s['k']:.3f}  "
            f"lr {s['k_learning_rate']:.4g} (base {s['k_base_learning_rate']:.3g})  "
            f"trace {s['k_trace']:.4g} ± {s['k_trace_stderr']:.2g}  "
            f"η·λ/edge {s['sharpness_ratio']:.2f}")
  accuracy = jnp.mean(jnp.argmax(apply_fn(params, {"x": x_test}), -1) == y_test)
  print(f"test accuracy {float(accuracy):.3f}")
  return float(accuracy)


if __name__ == "__main__":
  main()
