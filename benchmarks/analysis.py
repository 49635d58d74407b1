"""Aggregates run JSONs into the parity headline, per-optimizer ranges and band-sweep summaries.

Parity (issue 11): the worst test accuracy of ``k_controlled_sgd`` at its defaults over the
base-LR sweep, minus the best test accuracy of tuned ``optax.sgd`` + cosine. It holds when that
gap is ≥ −0.5 point. Accuracies are means over seeds at each base LR; a diverged run counts as 0.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

PARITY_POINTS = 0.005  # parity holds at >= best cosine - 0.5 point
# The kstep row the parity headline uses: the annealed band if it ran, else the constant band.
PARITY_KSTEP = ("kstep_anneal", "kstep")
# The Adam family's parity (issue 28): k_controlled_adam annealed at its defaults against the best
# tuned AdamW cosine, and against prodigy.
ADAM_KSTEP = ("kstep_adam_anneal",)


def _stat(values: list[float]) -> dict[str, float]:
  a = np.asarray(values, np.float64)
  return {"mean": float(np.mean(a)), "std": float(np.std(a)), "n": int(a.size)}


def _acc(run: dict[str, Any]) -> float:
  return 0.0 if run["summary"]["diverged"] else float(run["summary"]["test_acc"])


def _loss(run: dict[str, Any]) -> float:
  x = run["summary"]["train_loss"]
  return math.inf if run["summary"]["diverged"] or not math.isfinite(x) else float(x)


def opt_key(run: dict[str, Any]) -> str:
  """The optimizer's name, with its band when one was given (``kstep[0.4-0.8]``); the kstep rows
  at the controller's default band (``band`` null) are the bare name."""
  band = run.get("band")
  if band is None:
    return run["optimizer"]
  return f"{run['optimizer']}[{band[0]:g}-{band[1]:g}]"


def lr_table(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """``{optimizer: {lr: {acc, loss, diverged}}}`` (mean/std over seeds; diverged counts as 0
  accuracy and infinite loss). LR-free optimizers appear under the key ``"free"``."""
  groups: dict[tuple[str, str], list] = collections.defaultdict(list)
  swept = {opt_key(r) for r in runs if r["kind"] == "lr_sweep"}
  for r in runs:  # a band-sweep run counts where its band also has an LR sweep (same file key)
    if r["kind"] != "lr_sweep" and opt_key(r) not in swept:
      continue
    groups[(opt_key(r), "free" if r["lr"] is None else f"{r['lr']:g}")].append(r)
  table: dict[str, dict[str, Any]] = collections.defaultdict(dict)
  for (name, lr), rs in sorted(groups.items()):
    losses = [_loss(r) for r in rs]
    table[name][lr] = {
        "test_acc": _stat([_acc(r) for r in rs]),
        "train_loss": _stat(losses) if all(map(math.isfinite, losses)) else {"mean": math.inf},
        "diverged": sum(bool(r["summary"]["diverged"]) for r in rs),
        "seeds": len(rs),
    }
  return dict(table)


def _over_lrs(entry: dict[str, Any]) -> dict[str, Any]:
  accs = {lr: v["test_acc"]["mean"] for lr, v in entry.items()}
  lrs = sorted(accs, key=float)
  best = max(lrs, key=lambda lr: accs[lr])  # ties: the smallest LR
  worst = min(lrs, key=lambda lr: accs[lr])
  diverged = [lr for lr in lrs if entry[lr]["diverged"]]
  return {"best_lr": best, "best_acc": accs[best], "worst_lr": worst, "worst_acc": accs[worst],
          "spread": accs[best] - accs[worst], "diverged_lrs": diverged, "lrs": lrs,
          "seeds": max(v["seeds"] for v in entry.values())}


def points(x: float) -> float:
  """An accuracy difference in points (percent), rounded to 0.1."""
  return round(100.0 * x, 1) + 0.0  # + 0.0: no "-0.0"


def parity_sentence(gap: float) -> str:
  """``parity: kstep's worst base LR is X points above/below the best tuned cosine``."""
  p = points(gap)
  side = "above" if p >= 0 else "below"
  unit = "point" if abs(p) == 1.0 else "points"
  return f"parity: kstep's worst base LR is {abs(p):.1f} {unit} {side} the best tuned cosine"


def parity(per_opt: dict[str, dict[str, Any]], *, kstep_rows: tuple[str, ...] = PARITY_KSTEP,
           reference: str = "cosine", warmup: str = "warmup_cosine",
           optimizer: str = "k_controlled_sgd") -> dict[str, Any] | None:
  """The parity numbers and verdict, or None without a ``reference`` and a kstep row: the SGD
  family by default, the Adam family with ``kstep_rows=ADAM_KSTEP, reference="adamw_cosine",
  warmup="adamw_warmup_cosine"``."""
  row = next((name for name in kstep_rows if name in per_opt), None)
  if row is None or reference not in per_opt:
    return None
  k, c = per_opt[row], per_opt[reference]
  gap = k["worst_acc"] - c["best_acc"]
  bar = c["best_acc"] - PARITY_POINTS
  out = {
      "claim": f"{optimizer} at its defaults, at every base LR, >= best tuned {reference} - 0.5 "
               "point",
      "kstep_row": row, "kstep_worst": k["worst_acc"], "kstep_worst_lr": k["worst_lr"],
      "kstep_best": k["best_acc"], "kstep_best_lr": k["best_lr"],
      "kstep_diverged_lrs": k["diverged_lrs"], "kstep_lrs": k["lrs"],
      "kstep_acc_per_lr": k["acc_per_lr"],
      "cosine_best": c["best_acc"], "cosine_best_lr": c["best_lr"],
      "cosine_diverged_lrs": c["diverged_lrs"], "cosine_lrs": c["lrs"],
      "margin": gap, "gap_points": points(gap), "holds": k["worst_acc"] >= bar,
      "sentence": parity_sentence(gap),
  }
  out["lrs_failing"] = [lr for lr in k["lrs"] if k["acc_per_lr"][lr] < bar]
  if warmup in per_opt:
    w = per_opt[warmup]
    out["warmup_cosine_best"] = w["best_acc"]
    out["warmup_cosine_best_lr"] = w["best_lr"]
    out["gap_vs_warmup_cosine_points"] = points(k["worst_acc"] - w["best_acc"])
  return out


def adam_parity(per_opt: dict[str, dict[str, Any]],
                free: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
  """:func:`parity` for the Adam family, with ``vs_prodigy``: kstep Adam's worst base LR minus
  prodigy's mean (``None`` without prodigy runs)."""
  p = parity(per_opt, kstep_rows=ADAM_KSTEP, reference="adamw_cosine",
             warmup="adamw_warmup_cosine", optimizer="k_controlled_adam")
  if p is not None and "prodigy" in free:
    p["prodigy"] = free["prodigy"]["mean"]
    p["vs_prodigy"] = p["kstep_worst"] - free["prodigy"]["mean"]
  return p


def headline(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Per-optimizer best/worst over the LR sweep, the LR-free results and the parity check."""
  table = lr_table(runs)
  per_opt = {}
  for name, entry in table.items():
    if "free" in entry:
      continue
    per_opt[name] = _over_lrs(entry)
    per_opt[name]["acc_per_lr"] = {lr: v["test_acc"]["mean"] for lr, v in entry.items()}
  free = {name: {**entry["free"]["test_acc"], "diverged": entry["free"]["diverged"]}
          for name, entry in table.items() if "free" in entry}
  out: dict[str, Any] = {"per_optimizer": per_opt, "lr_free": free, "table": table}
  p = parity(per_opt)
  if p is not None:
    out["parity"] = p
  a = adam_parity(per_opt, free)
  if a is not None:
    out["adam_parity"] = a
  return out


def band_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Band sweep, per kstep optimizer: mean accuracy per (band, base LR) and the band with the
  best worst case. The LR sweep's default-band runs join as the default band's row (their band
  read from ``config.kstep.target``) where they share base LR and seed with the band sweep."""
  out = {}
  sweep = [r for r in runs if r["kind"] == "band_sweep"]
  for name in sorted({r["optimizer"] for r in sweep}):
    swept = {(r["lr"], r["seed"]) for r in sweep if r["optimizer"] == name}
    groups: dict[tuple, list[float]] = collections.defaultdict(list)
    default_band = None
    for r in runs:
      if r["optimizer"] != name:
        continue
      band = r["band"]
      if r["kind"] != "band_sweep":
        target = r["config"].get("kstep", {}).get("target")
        if band is not None or target is None or (r["lr"], r["seed"]) not in swept:
          continue
        band = default_band = tuple(target)
      groups[(tuple(band), f"{r['lr']:g}")].append(_acc(r))
    cells: dict[tuple, dict[str, float]] = collections.defaultdict(dict)
    for (band, lr), accs in groups.items():
      cells[band][lr] = float(np.mean(accs))
    rows = []
    for band, per_lr in cells.items():
      lo, hi = band
      rows.append({"band": list(band), "center": math.sqrt(lo * hi), "width": hi / lo,
                   "acc_per_lr": per_lr, "worst": min(per_lr.values()),
                   "mean": float(np.mean(list(per_lr.values())))})
    rows.sort(key=lambda r: (r["worst"], r["mean"]), reverse=True)
    out[name] = {
        "criterion": "max over bands of the worst (over base LRs) mean test accuracy",
        "recommended": rows[0]["band"], "rows": rows,
        "default": next((r for r in rows if default_band is not None
                         and np.allclose(r["band"], default_band, rtol=1e-3)), None)}
  return out
