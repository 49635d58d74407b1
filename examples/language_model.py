"""A byte-level transformer language model trained with k_controlled_adam: (B, T, V) logits.

The model returns logits of shape (B, T, 256) and the loss is the mean cross-entropy over the
B·T next-byte predictions. kstep takes the logits as they are: with
``loss="softmax_cross_entropy"`` every position is an example, so K_P = η S_P / (2·B·T) with
S_P the mean per-token trace of the preconditioned Gauss–Newton kernel (``docs/design.md``,
"Sequences"). ``batch_size``, where given, still counts sequences. Any text file will do; without
``--text`` the script trains on kstep's own source code. Under a minute on a CPU:

    python examples/language_model.py [--text shakespeare.txt] [--steps 300]
"""

import argparse
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kstep


class TransformerLM(nn.Module):
  width: int = 64
  heads: int = 2
  context: int = 64

  @nn.compact
  def __call__(self, tokens):  # (B, T) bytes -> (B, T, 256) logits
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context, self.width))
    h = nn.Embed(256, self.width)(tokens) + pos[: tokens.shape[-1]]
    attend = nn.MultiHeadDotProductAttention(num_heads=self.heads)
    h = h + attend(nn.LayerNorm()(h), mask=nn.make_causal_mask(tokens))
    h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(h))))
    return nn.Dense(256)(nn.LayerNorm()(h))


def main(argv: list[str] | None = None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--text", type=pathlib.Path, default=None, help="a text file")
  parser.add_argument("--learning-rate", type=float, default=1e-2, help="base learning rate")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
  parser.add_argument("--context", type=int, default=64)
  args = parser.parse_args(argv)

  if args.text is None:  # kstep's own source, ~130 kB of text
    files = sorted(pathlib.Path(kstep.__file__).parent.glob("**/*.py"))
    raw = b"".join(f.read_bytes() for f in files)
  else:
    raw = args.text.read_bytes()
  data = np.frombuffer(raw, np.uint8).astype(np.int32)
  split = int(0.9 * len(data))
  t = args.context

  def windows(part, n, rng):  # n random windows of t + 1 bytes: inputs and next bytes
    w = part[rng.integers(0, len(part) - t - 1, n)[:, None] + np.arange(t + 1)]
    return {"x": w[:, :-1], "y": w[:, 1:]}

  model = TransformerLM(context=t)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, t), jnp.int32))
  apply_fn = lambda p, batch: model.apply(p, batch["x"])  # (B, T, 256)

  def loss_fn(p, batch):
    logits = apply_fn(p, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  opt = kstep.k_controlled_adam(args.learning_rate, apply_fn=apply_fn,
                                loss="softmax_cross_entropy", decay_steps=args.steps)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(1)
  for i in range(args.steps):
    params, state, loss = step(params, state, windows(data[:split], args.batch_size, rng))
    if i % 50 == 0 or i == args.steps - 1:
      s = jax.device_get(kstep.stats(state))
      print(f"step {i:4d}  loss {float(loss):.3f}  K_P {s['k']:.2f}  "
            f"lr {s['k_learning_rate']:.3g}  examples per batch {args.batch_size * t}")
  val = windows(data[split:], 64, np.random.default_rng(2))
  bits = float(jax.jit(loss_fn)(params, val)) / np.log(2)
  print(f"validation bits per byte {bits:.3f}")
  return bits


if __name__ == "__main__":
  main()
