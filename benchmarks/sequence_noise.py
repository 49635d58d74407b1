"""Sequence models: how much independent gradient noise does one sequence's T tokens carry?

K = η S / (2 α B) counts the gradient noise of B independent examples. For a language model the
T tokens of a sequence share their text, so a sequence could carry the noise of T independent
tokens (B = tokens) or of one (B = sequences). This script measures it directly. With g_seq the
gradient of a sequence's summed token losses and g_tok the gradient of one token's loss (at a
uniformly drawn position of a window of the same length),

    ρ = tr(M Cov g_seq) / (T · tr(M Cov g_tok))

is 1 when the tokens' gradient noise is uncorrelated (B = tokens) and T when it is one draw
repeated (B = sequences). ``M`` is the identity (ρ_I) or the Gauss–Newton matrix of a reference
batch (ρ_G, the metric in which the noise raises the loss, as it enters K). Measured at
initialisation, after 1,000 steps of SGD (0.3, B = 16, T = 64) and after 1,000 steps of Adam
(3e-3), on the one-block transformer of :mod:`benchmarks.sequence_edge`; 256 sequences and 256
tokens per cell, standard errors from 8 chunks. Command (one core, ~3 min)::

    taskset -c 0 python -m benchmarks.sequence_noise --data-dir DATA [--out DIR]

The table goes to ``benchmarks/results/sequence_edge/noise.md``.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import results_io
from benchmarks import sequence_edge as se

N, CHUNKS = 256, 8


def train(model, params, data, opt, steps, seed):
  """``steps`` of ``opt`` on windows of B = 16, T = 64 (a trained point to measure at)."""
  def loss_fn(p, x):
    logits = model.apply({"params": p}, x[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]))

  @jax.jit
  def run(p, xs):
    def body(carry, x):
      p, s = carry
      u, s = opt.update(jax.grad(loss_fn)(p, x), s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(body, (p, opt.init(p)), xs)[0][0]

  return run(params, jnp.asarray(se.batches(data, 16, 64, steps, 20_000 + seed)))


def make_ratio(model):
  def token_losses(p, x):  # x: (T + 1,) -> (T,)
    logits = model.apply({"params": p}, x[None, :-1])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[1:])

  def flat(g):
    return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(g)])

  g_seq = jax.vmap(lambda p, x: flat(jax.grad(lambda q: jnp.sum(token_losses(q, x)))(p)),
                   (None, 0))
  g_tok = jax.vmap(lambda p, x, t: flat(jax.grad(lambda q: token_losses(q, x)[t])(p)),
                   (None, 0, 0))

  @jax.jit
  def quad_forms(params, seqs, toks, pos, ref):
    """Per-sample quadratic forms of the centred gradients in the identity and GN metrics."""
    gs, gt = g_seq(params, seqs), g_tok(params, toks, pos)
    gs, gt = gs - gs.mean(0), gt - gt.mean(0)
    _, unravel = jax.flatten_util.ravel_pytree(params)
    logits_ref = lambda p: model.apply({"params": p}, ref[:, :-1])
    probs = jax.nn.softmax(model.apply({"params": params}, ref[:, :-1]), -1)

    def gn_form(v):  # vᵀ G v = mean over reference tokens of ‖J v‖²_H
      jv = jax.jvp(logits_ref, (params,), (unravel(v),))[1]
      h = jnp.sum(probs * jv**2, -1) - jnp.sum(probs * jv, -1) ** 2
      return jnp.mean(h)

    return ((jnp.sum(gs**2, 1), jax.lax.map(gn_form, gs)),
            (jnp.sum(gt**2, 1), jax.lax.map(gn_form, gt)))

  return quad_forms


def ratios(quad_forms, params, data, t, seed):
  rng = np.random.default_rng(30_000 + seed + t)
  seqs = se.batches(data, N, t, 1, 40_000 + seed + t)[0]
  toks = se.batches(data, N, t, 1, 50_000 + seed + t)[0]
  pos = rng.integers(0, t, size=N)
  ref = se.batches(data, 16, 64, 1, 60_000 + seed)[0]
  (si, sg), (ti, tg) = jax.device_get(quad_forms(params, jnp.asarray(seqs), jnp.asarray(toks),
                                                 jnp.asarray(pos), jnp.asarray(ref)))
  out = {}
  for name, s, tk in (("rho_I", si, ti), ("rho_G", sg, tg)):
    chunks = [np.mean(a) / (t * np.mean(b))
              for a, b in zip(np.array_split(s, CHUNKS), np.array_split(tk, CHUNKS))]
    out[name] = float(np.mean(s) / (t * np.mean(tk)))
    out[name + "_se"] = float(np.std(chunks, ddof=1) / np.sqrt(CHUNKS))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=results_io.default_data_dir())
  p.add_argument("--out", type=pathlib.Path, default=results_io.RESULTS_DIR / "sequence_edge")
  p.add_argument("--lengths", default="4,16,64")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  data = se.load_bytes(args.data_dir)
  model = se.TinyLM()
  init = model.init(jax.random.key(args.seed), jnp.zeros((1, 8), jnp.int32))["params"]
  points = {"initialisation": init,
            "SGD 0.3, 1,000 steps": train(model, init, data, optax.sgd(0.3), 1000, args.seed),
            "Adam 3e-3, 1,000 steps": train(model, init, data, optax.adam(3e-3), 1000, args.seed)}
  quad_forms = make_ratio(model)
  rows = []
  for where, params in points.items():
    for t in [int(v) for v in args.lengths.split(",")]:
      row = {"point": where, "T": t, **ratios(quad_forms, params, data, t, args.seed)}
      rows.append(row)
      print(row, flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  env = results_io.environment()
  text = summary(rows) + (f"\nMachine: {env['platform']}, {env['cpu_count']} CPU cores, jax "
                          f"{env['jax']}; seed {args.seed}; commit {env['git']['commit'][:7]}.\n")
  (args.out / "noise.md").write_text(text)
  print(text)


def summary(rows: list[dict]) -> str:
  lines = ["# Sequence models: the gradient noise of a sequence against T independent tokens", "",
           "Written by `python -m benchmarks.sequence_noise`; do not edit by hand. "
           "ρ = tr(M Cov g_seq) / (T tr(M Cov g_tok)): 1 when a sequence's T tokens carry "
           "independent noise (B = tokens in K), T when they carry one draw (B = sequences); "
           f"M the identity (ρ_I) or a reference batch's Gauss–Newton matrix (ρ_G); {N} "
           f"sequences and {N} tokens per cell, ± a standard error over {CHUNKS} chunks.", "",
           "| point | T | ρ_I | ρ_G |", "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['point']} | {r['T']} | {r['rho_I']:.2f} ± {r['rho_I_se']:.2f} | "
                 f"{r['rho_G']:.2f} ± {r['rho_G_se']:.2f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
