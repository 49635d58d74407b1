"""The language-model table: validation bits per byte of the Adam family on ``shakespeare_lm``.

Reads the run JSONs that ``python -m benchmarks run shakespeare_lm --losses ce ...`` wrote and
writes ``benchmarks/results/shakespeare_lm/summary.md``: per optimizer and base LR the mean
validation bits per byte over seeds (a diverged run counts as +inf), the best tuned AdamW cosine
(the lowest mean among the LRs run with the most seeds), ``k_controlled_adam``'s worst and best
base LR against it (parity: at most 1 % above) and against prodigy. Command::

    python -m benchmarks.lm_report [--results-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any

import numpy as np

from benchmarks import optimizers, results_io, tasks

TASK = "shakespeare_lm"
BASELINES = ("adamw_cosine", "adamw_warmup_cosine", "schedule_free_adamw")
PARITY_FACTOR = 1.01  # kstep's worst base LR within 1 % of the best tuned AdamW cosine


def bits_per_byte(run: dict[str, Any]) -> float:
  """Validation bits per byte of a run (its mean per-token cross-entropy / ln 2); +inf for a
  diverged run."""
  s = run["summary"]
  if s["diverged"] or not math.isfinite(s["test_loss"]):
    return math.inf
  return s["test_loss"] / math.log(2)


def table(runs: list[dict[str, Any]]) -> dict[str, dict[Any, list[float]]]:
  """``{optimizer: {lr: [bits per byte of each seed]}}`` (lr None for the LR-free)."""
  out: dict[str, dict[Any, list[float]]] = {}
  for r in sorted(runs, key=lambda r: (r["optimizer"], r["lr"] or 0.0, r["seed"])):
    out.setdefault(r["optimizer"], {}).setdefault(r["lr"], []).append(bits_per_byte(r))
  return out


def best(per_lr: dict[Any, list[float]]) -> tuple[Any, float, int]:
  """``(lr, mean, seeds)`` of the lowest mean among the LRs run with the most seeds."""
  most = max(len(v) for v in per_lr.values())
  lr = min((lr for lr, v in per_lr.items() if len(v) == most), key=lambda lr: np.mean(per_lr[lr]))
  return lr, float(np.mean(per_lr[lr])), most


def _lr(lr: Any) -> str:
  return "free" if lr is None else f"{lr:g}"


def _bpb(x: float) -> str:
  return "diverged" if not math.isfinite(x) else f"{x:.3f}"


def summary(runs: list[dict[str, Any]], problem_notes: str, steps: int, batch_size: int) -> str:
  t = table(runs)
  lines = [f"# {TASK}: validation bits per byte", "",
           "Written by `python -m benchmarks.lm_report`; do not edit by hand. "
           f"{problem_notes}; B = {batch_size} sequences, {steps} steps. Mean over seeds "
           "(seeds in brackets); a diverged run counts as diverged. Lower is better.", ""]
  if "adamw_cosine" in t and "kstep_adam_anneal" in t:
    lr_c, cos, n_c = best(t["adamw_cosine"])
    kst = {lr: float(np.mean(v)) for lr, v in t["kstep_adam_anneal"].items()}
    worst_lr, best_lr = max(kst, key=kst.get), min(kst, key=kst.get)
    gap = 100 * (kst[worst_lr] / cos - 1)
    verdict = "holds" if kst[worst_lr] <= PARITY_FACTOR * cos else "misses"
    prod = t.get("prodigy", {}).get(None)
    prod_cell = _bpb(float(np.mean(prod))) if prod else "-"
    vs_prod = (f"{100 * (kst[worst_lr] / float(np.mean(prod)) - 1):+.1f} %" if prod
               and math.isfinite(kst[worst_lr]) else "-")
    seeds = sorted({len(v) for v in t["kstep_adam_anneal"].values()})
    lines += ["| best tuned AdamW cosine (LR) | kstep Adam annealed worst / best (LR) | "
              "kstep seeds × base LRs | worst vs cosine | parity (≤ +1 %) | prodigy | "
              "kstep worst vs prodigy |", "|---|---|---|---|---|---|---|",
              f"| {_bpb(cos)} ({_lr(lr_c)}, {n_c} seeds) | {_bpb(kst[worst_lr])} "
              f"({_lr(worst_lr)}) / {_bpb(kst[best_lr])} ({_lr(best_lr)}) | "
              f"{'/'.join(map(str, seeds))} × {len(kst)} | {gap:+.1f} % | {verdict} | "
              f"{prod_cell} | {vs_prod} |", ""]
  lrs = sorted({lr for v in t.values() for lr in v if lr is not None})
  names = [n for n in (*BASELINES, "kstep_adam_anneal", "prodigy") if n in t]
  lines += ["| base LR | " + " | ".join(optimizers.SHORT.get(n, n) for n in names) + " |",
            "|---" * (len(names) + 1) + "|"]
  for lr in [*lrs, None]:
    cells = []
    for n in names:
      v = t[n].get(lr)
      cells.append(f"{_bpb(float(np.mean(v)))} [{len(v)}]" if v else "")
    if any(cells):
      lines.append(f"| {_lr(lr)} | " + " | ".join(cells) + " |")
  envs = {(r["env"]["platform"], r["env"]["cpu_count"], r["env"]["jax"]) for r in runs}
  commits = sorted({(r["env"].get("git") or {}).get("commit") or "?" for r in runs})
  lines += ["", f"Machines: {'; '.join(f'{p}, {c} CPU cores, jax {j}' for p, c, j in envs)}; "
            f"commits {', '.join(c[:7] for c in commits)}. Command: `python -m benchmarks run "
            f"{TASK} --losses ce --optimizers {','.join(names)} --seeds S --data-dir DATA` "
            "(one process per core), then `python -m benchmarks.lm_report`."]
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--results-dir", type=pathlib.Path, default=results_io.RUNS_DIR)
  p.add_argument("--out", type=pathlib.Path, default=None)
  args = p.parse_args()
  d = tasks.defaults(TASK, "cpu")
  runs = results_io.load_runs(args.results_dir, TASK, "cpu", "ce", steps=d.steps,
                              batch_size=d.batch_size)
  if not runs:
    raise SystemExit(f"no {TASK} runs under {args.results_dir}")
  notes = runs[0]["config"].get("notes", "")
  text = summary(runs, notes, d.steps, d.batch_size)
  out = results_io.summary_dir(args.results_dir, args.out) / TASK
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
