"""Aggregates run JSONs into the headline numbers and the must-show checks of a task."""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

from benchmarks import optimizers

ROBUST_POINTS = 0.01  # "within 1 point" of accuracy
PARITY_POINTS = 0.005


def _stat(values: list[float]) -> dict[str, float]:
  a = np.asarray(values, np.float64)
  return {"mean": float(np.mean(a)), "std": float(np.std(a)), "n": int(a.size)}


def _acc(run: dict[str, Any]) -> float:
  return 0.0 if run["summary"]["diverged"] else float(run["summary"]["test_acc"])


def _loss(run: dict[str, Any]) -> float:
  x = run["summary"]["train_loss"]
  return math.inf if run["summary"]["diverged"] or not math.isfinite(x) else float(x)


def opt_key(run: dict[str, Any]) -> str:
  """The optimizer's name, with its band when that is not the default one."""
  band = run.get("band")
  if band is None or np.allclose(band, optimizers.DEFAULT_BAND, rtol=1e-3):
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
  best = max(accs, key=accs.get)
  worst = min(accs, key=accs.get)
  diverged = [lr for lr, v in entry.items() if v["diverged"]]
  return {"best_lr": best, "best_acc": accs[best], "worst_lr": worst, "worst_acc": accs[worst],
          "spread": accs[best] - accs[worst], "diverged_lrs": diverged,
          "lrs": sorted(accs, key=float)}


def headline(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Per-optimizer best/worst over the LR sweep and the two must-show checks."""
  table = lr_table(runs)
  per_opt = {name: _over_lrs(entry) for name, entry in table.items() if "free" not in entry}
  free = {name: entry["free"]["test_acc"] for name, entry in table.items() if "free" in entry}
  out: dict[str, Any] = {"per_optimizer": per_opt, "lr_free": free, "table": table}
  if "cosine" in per_opt:
    c = per_opt["cosine"]["best_acc"]
    out["checks_all_kstep"] = {
        name: {"spread": v["spread"], "robust_within_1pt": v["spread"] <= ROBUST_POINTS,
               "worst": v["worst_acc"], "parity_margin_vs_best_cosine": v["worst_acc"] - c,
               "parity_holds": v["worst_acc"] >= c - PARITY_POINTS}
        for name, v in per_opt.items() if name.startswith("kstep")}
  if "kstep" in per_opt:
    k = per_opt["kstep"]
    out["lr_robustness"] = {
        "claim": "k_controlled_sgd (default band, constant base LR) test accuracy over the whole "
                 "base-LR sweep within 1 point of its best",
        "kstep_range": [k["worst_acc"], k["best_acc"]], "kstep_spread": k["spread"],
        "holds": k["spread"] <= ROBUST_POINTS,
    }
    if "cosine" in per_opt:
      c = per_opt["cosine"]
      out["lr_robustness"]["cosine_best"] = c["best_acc"]
      out["lr_robustness"]["cosine_best_lr"] = c["best_lr"]
      out["lr_robustness"]["cosine_spread"] = c["spread"]
      out["lr_robustness"]["cosine_diverged_lrs"] = c["diverged_lrs"]
      out["parity"] = {
          "claim": "k_controlled_sgd at the default band, at every base LR, >= best tuned "
                   "cosine - 0.5 point",
          "kstep_worst": k["worst_acc"], "kstep_worst_lr": k["worst_lr"],
          "cosine_best": c["best_acc"], "margin": k["worst_acc"] - c["best_acc"],
          "holds": k["worst_acc"] >= c["best_acc"] - PARITY_POINTS,
          "lrs_failing": [lr for lr, v in table["kstep"].items()
                          if v["test_acc"]["mean"] < c["best_acc"] - PARITY_POINTS],
      }
  return out


def band_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Band sweep: mean accuracy per (band, base LR) and the band with the best worst case."""
  groups: dict[tuple, list[float]] = collections.defaultdict(list)
  swept = {(r["lr"], r["seed"]) for r in runs if r["kind"] == "band_sweep"}
  for r in runs:
    default = (r["kind"] == "lr_sweep" and opt_key(r) == "kstep"
               and (r["lr"], r["seed"]) in swept)  # the default band, from the LR sweep
    if r["kind"] != "band_sweep" and not default:
      continue
    groups[(tuple(r["band"]), f"{r['lr']:g}")].append(_acc(r))
  if not groups:
    return {}
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
  return {"criterion": "max over bands of the worst (over base LRs) mean test accuracy",
          "recommended": rows[0]["band"], "rows": rows,
          "default": next((r for r in rows if np.allclose(r["band"], optimizers.DEFAULT_BAND,
                                                          rtol=1e-3)), None)}
