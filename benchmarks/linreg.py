"""The K paper's Figure 1: linear regression with J i.i.d. N(0,1) of shape 100x120, B = 5.

For each step η: K from Theorem 2.1 (:func:`kstep.k_exact`), the high-dimensional estimator
(:func:`kstep.k_high_dim`), the trace estimator (:func:`kstep.k_from_trace`), the spectral radius
of the second-moment operator (:func:`kstep.second_moment_growth`), and the loss of plain SGD
(batches of B drawn without replacement, i.i.d. across steps) after 10⁴ steps from θ = 0.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import kstep  # noqa: E402
from benchmarks import results_io  # noqa: E402

N, P, B = 100, 120, 5
DEFAULT_ETAS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.065, 0.07, 0.075, 0.08, 0.085, 0.09, 0.1,
                0.12)
DIVERGED = 1e3  # final loss / initial loss above which a run counts as diverged


def problem(seed: int = 0) -> tuple[jax.Array, jax.Array]:
  kj, ky = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(kj, (N, P)), jax.random.normal(ky, (N,))


def sgd_losses(jac, y, etas, seeds, steps: int, record: int = 100):
  """Loss ``(1/2N)‖Jθ − y‖²`` every ``record`` steps: ``(len(etas), len(seeds), steps/record)``."""

  def run(eta, seed):
    def step(theta, key):
      idx = jax.random.choice(key, N, (B,), replace=False)
      z = jac[idx] @ theta - y[idx]
      theta = theta - eta / B * jac[idx].T @ z
      return theta, 0.5 * jnp.mean(jnp.square(jac @ theta - y))

    keys = jax.random.split(jax.random.PRNGKey(seed), steps)
    _, losses = jax.lax.scan(step, jnp.zeros(P), keys)
    return losses.reshape(-1, record)[:, -1]

  runs = jax.vmap(jax.vmap(run, (None, 0)), (0, None))
  return np.asarray(jax.jit(runs)(jnp.asarray(etas), jnp.asarray(seeds)))


def main(args: argparse.Namespace) -> None:
  root = args.results_dir / "linreg"
  path = root / "linreg.json"
  if path.exists() and not args.force:
    print(f"{path} exists (use --force to rerun)")
    return
  etas = list(args.etas or DEFAULT_ETAS)
  jac, y = problem(0)
  ntk = jac @ jac.T / N
  lam = jnp.linalg.eigvalsh(ntk)
  trace = jnp.trace(ntk)
  rows = []
  t0 = time.perf_counter()
  for eta in etas:
    rows.append({
        "eta": eta,
        "k_exact": float(kstep.k_exact(ntk, eta, B)),
        "k_high_dim": float(kstep.k_high_dim(eta, B, lam)),
        "k_from_trace": float(kstep.k_from_trace(eta, B, trace)),
        "second_moment_growth": float(kstep.second_moment_growth(ntk, eta, B)),
    })
  t_k = time.perf_counter() - t0
  losses = sgd_losses(jac, y, etas, args.seeds, args.steps)
  init_loss = float(0.5 * jnp.mean(jnp.square(y)))
  for row, curve in zip(rows, losses):
    final = curve[:, -1]
    row["sgd_final_loss"] = final.tolist()
    row["diverged"] = [bool(not np.isfinite(f) or f > DIVERGED * init_loss) for f in final]
  lam_max = float(lam[-1])
  diverging = [r["eta"] for r in rows if any(r["diverged"])]
  converging = [r["eta"] for r in rows if not any(r["diverged"])]
  ks = np.array([r["k_exact"] for r in rows])
  cross = None
  i = int(np.argmax(ks >= 1.0)) if (ks >= 1.0).any() else None
  if i:
    cross = float(np.interp(1.0, ks[i - 1:i + 1], etas[i - 1:i + 1]))
  summary = {
      "setting": f"J iid N(0,1) {N}x{P}, y iid N(0,1), B={B}, theta0=0, SGD {args.steps} steps, "
                 f"batches without replacement; NTK = J J^T / N",
      "lambda_max": lam_max, "two_over_lambda_max": 2.0 / lam_max, "ntk_trace": float(trace),
      "largest_converging_eta": max([e for e in converging if not diverging or
                                     e < min(diverging)], default=None),
      "smallest_diverging_eta": min(diverging, default=None),
      "eta_at_k_exact_1": cross, "initial_loss": init_loss, "k_seconds": t_k,
  }
  payload = {"task": "linreg", "summary": summary, "rows": rows, "seeds": list(args.seeds),
             "loss_every_100_steps": {f"{e:g}": c[0].tolist()[::2] for e, c in zip(etas, losses)},
             "env": results_io.environment()}
  results_io.save_json(path, payload)
  plot(rows, summary, root / "linreg_k_vs_eta.png")
  print(summary)


def plot(rows, summary, path) -> None:
  etas = np.array([r["eta"] for r in rows])
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for key, style in (("k_exact", "o-"), ("k_high_dim", "s--"), ("k_from_trace", "^:"),
                     ("second_moment_growth", "d-.")):
    vals = np.array([r[key] for r in rows], float)
    ax.plot(etas, np.where(np.isfinite(vals), vals, np.nan), style, ms=4, label=key)
  ax.axhline(1.0, color="k", lw=0.8)
  div = np.array([any(r["diverged"]) for r in rows])
  if div.any():
    ax.axvspan(etas[div].min(), etas.max(), color="tab:red", alpha=0.1,
               label="SGD diverged (10^4 steps)")
  ax.set(xlabel="eta", ylabel="K  /  second-moment growth", ylim=(0, 2.0),
         title=f"K vs eta (2/lambda_max = {summary['two_over_lambda_max']:.3f})")
  ax.legend(fontsize=7)
  for r in rows:
    final = np.array(r["sgd_final_loss"], float)
    final = np.where(np.isfinite(final), final, 1e30)
    color = "tab:red" if any(r["diverged"]) else "tab:blue"
    ax2.scatter([r["eta"]] * len(final), final, color=color, s=12)
  ax2.set(xlabel="eta", ylabel="SGD loss after 10^4 steps", yscale="log",
          title="red: diverged, blue: converged")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
