"""Sequence models and the noise edge: is B the number of sequences or the number of tokens?

A language model's outputs are (B, T, V) and its loss the mean over the B·T tokens, but the T
tokens of a sequence are not independent samples. K = η S / (2 α B) needs a B and a per-example
trace S. Two conventions, with S_tok the mean per-token Gauss–Newton trace (cross-entropy,
total over the V logits):

* ``tokens``: each token an example, K_tok = η S_tok / (2 B T);
* ``sequences``: each sequence an example whose loss is the mean over its T tokens; its trace
  is S_tok again (the 1/T of the mean times T tokens' traces), K_seq = η S_tok / (2 B) = T·K_tok.

They differ by T, so where constant-LR SGD diverges at several B and T decides between them: the
right convention reads the same K at the edge whatever T. This script trains a small byte-level
causal transformer (1 block, width 64, 2 heads) on a text file with constant-LR SGD (no
momentum), finds the divergence step η* for each (B, T, seed) by bisection (divergent: the loss
not finite, or its mean over the last 20 of 300 steps above the initial loss), measures S_tok
(Hutchinson, 64 probes) and the Gauss–Newton λ_max (Lanczos) on 8 batches at the end of the
run at the largest stable step (and at θ₀, where a cross-entropy's curvature is far from what
it becomes), and reports η*, K_tok, K_seq and η*·λ_max/2 (the curvature edge, 1 there).
Command (one core, ~10 min)::

    taskset -c 0 python -m benchmarks.sequence_edge --data-dir DATA [--out DIR] [--quick]

The table goes to ``benchmarks/results/sequence_edge/summary.md`` (``--out`` for another folder)
and the raw numbers beside it as ``runs.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kstep
from benchmarks import results_io

V, WIDTH, HEADS, STEPS = 256, 64, 2, 300


class TinyLM(nn.Module):
  """Byte-level causal transformer: embedding + positions, one pre-LN block, readout."""

  @nn.compact
  def __call__(self, tokens):
    t = tokens.shape[-1]
    pos = self.param("pos", nn.initializers.normal(0.02), (512, WIDTH))
    h = nn.Embed(V, WIDTH)(tokens) + pos[:t]
    mask = nn.make_causal_mask(tokens)
    h = h + nn.SelfAttention(num_heads=HEADS, qkv_features=WIDTH)(nn.LayerNorm()(h), mask=mask)
    h = h + nn.Dense(WIDTH)(nn.gelu(nn.Dense(4 * WIDTH)(nn.LayerNorm()(h))))
    return nn.Dense(V)(nn.LayerNorm()(h))


def load_bytes(data_dir: str) -> np.ndarray:
  return np.frombuffer((pathlib.Path(data_dir) / "shakespeare.txt").read_bytes(), np.uint8)


def batches(data: np.ndarray, b: int, t: int, n: int, seed: int) -> np.ndarray:
  """``n`` batches of ``b`` random windows of ``t + 1`` bytes: (n, b, t + 1) int32."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(data) - t - 1, size=(n, b))
  return data[starts[..., None] + np.arange(t + 1)].astype(np.int32)


def make_fns(model: TinyLM):
  def logits(params, batch):  # (B·T, V): every token a row
    return model.apply({"params": params}, batch["x"]).reshape(-1, V)

  def loss_fn(params, batch):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits(params, batch), batch["y"].reshape(-1)))

  @jax.jit
  def train(params, xs, eta):
    opt = optax.sgd(eta)

    def body(carry, x):
      p, s = carry
      batch = {"x": x[:, :-1], "y": x[:, 1:]}
      loss, g = jax.value_and_grad(loss_fn)(p, batch)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (final, _), losses = jax.lax.scan(body, (params, opt.init(params)), xs)
    return losses, final

  @jax.jit
  def measure(params, x, key):
    batch = {"x": x[:, :-1]}
    s = kstep.gauss_newton_trace(logits, params, batch, loss="softmax_cross_entropy", key=key,
                                 num_probes=64).value
    lam = kstep.gauss_newton_lambda_max(logits, params, batch, loss="softmax_cross_entropy",
                                        key=key).value
    return s, lam

  return measure, train


def diverges(losses: np.ndarray) -> bool:
  return not np.all(np.isfinite(losses)) or float(np.mean(losses[-20:])) > float(losses[0])


def edge_step(train, params, xs, lo=1e-2, hi=1e4, iters=12):
  """Bisection (geometric) for the smallest divergent η between ``lo`` (stable) and ``hi``;
  returns η* and the params at the end of the run at the largest stable step found."""
  stable = None
  for _ in range(iters):
    mid = float(np.sqrt(lo * hi))
    losses, final = train(params, xs, jnp.float32(mid))
    if diverges(np.asarray(losses)):
      hi = mid
    else:
      lo, stable = mid, final
  return float(np.sqrt(lo * hi)), stable


def curvature(measure, params, data, b, t, seed):
  """S_tok (mean per-token GN trace, Hutchinson, 64 probes) and the GN λ_max (Lanczos) at
  ``params``, averaged over 8 batches of the run's shape."""
  out = [measure(params, jnp.asarray(x), jax.random.key(i))
         for i, x in enumerate(batches(data, b, t, 8, 10_000 + seed))]
  return tuple(float(np.mean([o[j] for o in out])) for j in (0, 1))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=results_io.default_data_dir())
  p.add_argument("--out", type=pathlib.Path,
                 default=results_io.RESULTS_DIR / "sequence_edge")
  p.add_argument("--batch-sizes", default="2,8,32")
  p.add_argument("--lengths", default="8,32,128")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--quick", action="store_true", help="B 2,8; T 8,32; one seed")
  args = p.parse_args()
  bs = [2, 8] if args.quick else [int(v) for v in args.batch_sizes.split(",")]
  ts = [8, 32] if args.quick else [int(v) for v in args.lengths.split(",")]
  seeds = [0] if args.quick else [int(v) for v in args.seeds.split(",")]
  data = load_bytes(args.data_dir)
  model = TinyLM()
  measure, train = make_fns(model)
  rows = []
  for seed in seeds:
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    for b in bs:
      for t in ts:
        t0 = time.perf_counter()
        xs = jnp.asarray(batches(data, b, t, STEPS, seed))
        eta, stable = edge_step(train, params, xs)
        s0, lam0 = curvature(measure, params, data, b, t, seed)
        s_tok, lam = curvature(measure, stable, data, b, t, seed)
        row = {"seed": seed, "B": b, "T": t, "eta_star": eta, "S_tok": s_tok, "lambda_max": lam,
               "S_tok_init": s0, "lambda_max_init": lam0,
               "K_tok": eta * s_tok / (2 * b * t), "K_seq": eta * s_tok / (2 * b),
               "curvature_ratio": eta * lam / 2, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "runs.json").write_text(json.dumps({"rows": rows, "env": results_io.environment(),
                                                  "steps": STEPS}, indent=1))
  (args.out / "summary.md").write_text(summary(rows))
  print(summary(rows))


def summary(rows: list[dict]) -> str:
  lines = ["# Sequence models: where constant-LR SGD diverges", "",
           "Written by `python -m benchmarks.sequence_edge`; do not edit by hand. Tiny byte-level "
           f"causal transformer (width {WIDTH}, 1 block), SGD without momentum, {STEPS} steps; "
           "means over seeds (range in brackets). K_tok = η*·S_tok/(2BT), "
           "K_seq = η*·S_tok/(2B), curvature = η*·λ_max/2.", "",
           "| B | T | η* | S_tok | K_tok | K_seq | curvature |", "|---|---|---|---|---|---|---|"]
  keys = sorted({(r["B"], r["T"]) for r in rows})
  for b, t in keys:
    rs = [r for r in rows if (r["B"], r["T"]) == (b, t)]

    def cell(name, fmt="{:.3g}"):
      v = [r[name] for r in rs]
      rng = f" [{fmt.format(min(v))}, {fmt.format(max(v))}]" if len(v) > 1 else ""
      return fmt.format(float(np.mean(v))) + rng

    lines.append(f"| {b} | {t} | {cell('eta_star')} | {cell('S_tok')} | {cell('K_tok')} | "
                 f"{cell('K_seq')} | {cell('curvature_ratio')} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
