"""How much the guard's λ_max depends on the rows it is measured on: digits MLP against the LM.

The curvature guard of ``k_controlled_adam`` runs its power steps on the probe rows
(``Estimate.probe_batch_size`` = 16 examples: 16 images of digits, 16 sequences = 1,024 tokens
of ``shakespeare_lm``). A mini-batch Gauss–Newton matrix's λ_max grows as the batch shrinks, so
the same guard ratio caps the two tasks at different fractions of their full-batch edge. This
script trains each task's model with Adam (3e-3, 300 steps, the task's batch size), forms Adam's
P = √v̂ + ε (floored at 0.1 of each leaf's mean, as the controller does) and prints
λ_max(P^{-1/2} G P^{-1/2}) (Lanczos, 30 iterations) on random row sets of several sizes (mean
of 4 draws below 200 rows). Command (~3 min on one core)::

    python -m benchmarks.guard_rows --data-dir DATA
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kstep
from benchmarks import results_io, tasks
from kstep._src.k_estimate import in_preconditioned_coordinates
from kstep._src.preconditioners import DIAGONAL_FLOOR


def trained(problem: tasks.Problem, steps: int, lr: float):
  """Params and Adam's floored P after ``steps`` of Adam at ``lr`` on random batches."""
  params = problem.init(jax.random.PRNGKey(0))
  opt = optax.adam(lr)
  state = opt.init(params)
  loss = lambda q, x, y: jnp.mean(problem.per_example_loss(problem.apply(q, x), y))

  @jax.jit
  def step(q, s, x, y):
    u, s = opt.update(jax.grad(loss)(q, x, y), s, q)
    return optax.apply_updates(q, u), s

  rng = np.random.default_rng(0)
  for _ in range(steps):
    i = rng.integers(0, len(problem.x_train), problem.batch_size)
    params, state = step(params, state, jnp.asarray(problem.x_train[i]),
                         jnp.asarray(problem.y_train[i]))
  adam = state[0]
  p = jax.tree.map(lambda v: jnp.sqrt(v / (1 - 0.999 ** adam.count)) + 1e-8, adam.nu)
  return params, jax.tree.map(lambda x: jnp.maximum(x, DIAGONAL_FLOOR * jnp.mean(x)), p)


def lambda_by_rows(problem: tasks.Problem, params, p, sizes) -> dict[int, float]:
  inv_sqrt = jax.tree.map(lambda x: 1 / jnp.sqrt(x), p)
  apply_phi, phi = in_preconditioned_coordinates(lambda q, b: problem.apply(q, b["x"]), params,
                                                 inv_sqrt)
  out = {}
  for n in sizes:
    lams = []
    for r in range(4 if n < 200 else 1):
      i = np.random.default_rng(100 + r).choice(len(problem.x_train), n, replace=False)
      lams.append(float(kstep.gauss_newton_lambda_max(
          apply_phi, phi, {"x": jnp.asarray(problem.x_train[i])},
          loss="softmax_cross_entropy", num_iters=30).value))
    out[n] = float(np.mean(lams))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=results_io.default_data_dir())
  args = p.parse_args()
  lr = 3e-3
  for task, sizes in (("digits_mlp", (16, 64, 1024)), ("shakespeare_lm", (16, 64, 256))):
    problem = tasks.load(task, "ce", data_dir=args.data_dir)
    params, pre = trained(problem, 300, lr)
    lam = lambda_by_rows(problem, params, pre, sizes)
    full = lam[sizes[-1]]
    print(f"{task}: " + ", ".join(f"{n} rows λ {v:.0f} (η·λ {lr * v:.2f}, {v / full:.2f}× "
                                  f"{sizes[-1]} rows)" for n, v in lam.items()), flush=True)


if __name__ == "__main__":
  main()
