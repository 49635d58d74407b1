"""Matplotlib PNGs from run JSONs and summaries (Agg backend, no display needed)."""

from __future__ import annotations

import io
import math
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import analysis, optimizers  # noqa: E402

COLORS = {"sgd": "tab:gray", "cosine": "tab:blue", "warmup_cosine": "tab:cyan",
          "kstep_anneal": "tab:red", "kstep_warmup": "tab:pink", "kstep": "tab:orange",
          "kstep_cosine": "gold",
          "schedule_free": "tab:green", "prodigy": "tab:purple", "dog": "tab:brown",
          "adamw_cosine": "navy", "adamw_warmup_cosine": "teal", "kstep_adam_anneal": "darkred",
          "schedule_free_adamw": "darkgreen",
          "polyak_sgd": "tab:olive"}


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  """Saves ``fig`` as a 256-colour PNG (line plots lose nothing visible; a third of the bytes,
  which keeps the committed ``benchmarks/results/`` small)."""
  from PIL import Image  # matplotlib's own dependency

  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, dpi=80)
  plt.close(fig)
  buf.seek(0)
  with Image.open(buf) as im:
    im.convert("RGB").quantize(256).save(path, optimize=True)
  return path


def lr_sweep(table: dict[str, dict[str, Any]], title: str, path: pathlib.Path) -> pathlib.Path:
  """Headline: final train loss and test accuracy vs base LR, one line per optimizer."""
  fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
  blown = []  # (LRs, color) of diverged runs, drawn at the top of the loss axis
  for name, entry in table.items():
    color = COLORS.get(name, "tab:pink" if name.startswith("kstep") else None)
    label = optimizers.LABELS.get(name, name.replace("[", ", band ["))
    if "free" in entry:
      acc = entry["free"]["test_acc"]
      ax_a.axhline(acc["mean"], color=color, ls="--", label=label)
      loss = entry["free"]["train_loss"]["mean"]
      if math.isfinite(loss):
        ax_l.axhline(loss, color=color, ls="--", label=label)
      continue
    lrs = sorted(entry, key=float)
    x = np.array([float(lr) for lr in lrs])
    acc = np.array([entry[lr]["test_acc"]["mean"] for lr in lrs])
    err = np.array([entry[lr]["test_acc"]["std"] for lr in lrs])
    loss = np.array([entry[lr]["train_loss"]["mean"] for lr in lrs])
    div = np.array([entry[lr]["diverged"] > 0 for lr in lrs])
    ax_a.errorbar(x, acc, err, color=color, marker="o", ms=4, label=label, capsize=2)
    ax_a.scatter(x[div], acc[div], color=color, marker="x", s=60, zorder=5)
    ok = np.isfinite(loss)
    ax_l.plot(x[ok], loss[ok], color=color, marker="o", ms=4, label=label)
    if (~ok).any():
      blown.append((x[~ok], color))
  top = ax_l.get_ylim()[1]
  for xs, color in blown:
    ax_l.scatter(xs, np.full(len(xs), top), color=color, marker="x", s=60, clip_on=False)
  ax_l.set(xscale="log", yscale="log", xlabel="base learning rate", ylabel="final train loss",
           title="train loss (x: diverged)")
  ax_a.set(xscale="log", xlabel="base learning rate", ylabel="test accuracy",
           title="test accuracy (mean ± std over seeds; x: diverged)")
  lo = min((v["test_acc"]["mean"] for e in table.values() for v in e.values()
            if v["test_acc"]["mean"] > 0.5), default=0.0)
  ax_a.set_ylim(max(0.0, lo - 0.05), None)
  ax_a.legend(fontsize=7, loc="lower left")
  fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def _band_curve(run: dict[str, Any], steps: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """The band (lo, hi) a kstep run aimed at, at each step (cosine-decayed when annealed)."""
  cfg = run["config"].get("kstep")
  target = cfg["target"] if cfg else run.get("band")
  if target is None:
    return None
  decay = np.ones_like(steps, dtype=float)
  if cfg and cfg.get("decay_steps"):
    frac = np.minimum(steps / cfg["decay_steps"], 1.0)
    decay = 0.5 * (1.0 + np.cos(np.pi * frac))
  return target[0] * decay, target[1] * decay


def trajectories(runs: list[dict[str, Any]], lr: float, title: str,
                 path: pathlib.Path) -> pathlib.Path:
  """K and the step taken of the parity kstep row (annealed if it ran) at every base LR (seed
  0), and loss curves of all optimizers at base LR ``lr``."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  present = {analysis.opt_key(r) for r in runs if r["kind"] == "lr_sweep"}
  row = next((n for n in analysis.PARITY_KSTEP if n in present), "kstep")
  ks = sorted([r for r in runs if analysis.opt_key(r) == row and r["seed"] == 0
               and r["kind"] == "lr_sweep"], key=lambda r: r["lr"])
  cmap = plt.get_cmap("viridis")
  for i, r in enumerate(ks):
    t = r["trajectory"]
    c = cmap(i / max(len(ks) - 1, 1))
    axes[0].plot(t["step"], t["k"], color=c, label=f"base LR {r['lr']:g}")
    axes[1].plot(t["step"], t["lr"], color=c)
  band = _band_curve(ks[0], np.asarray(ks[0]["trajectory"]["step"], float)) if ks else None
  norm = ks[0]["config"].get("kstep", {}).get("output_norm", "total") if ks else "total"
  if band is not None:
    axes[0].fill_between(ks[0]["trajectory"]["step"], *band, color="tab:red", alpha=0.1,
                         label="band")
  axes[0].set(xlabel="step", ylabel=f"K ({norm})", title=f"{row}: K")
  axes[0].legend(fontsize=7)
  axes[1].set(xlabel="step", ylabel="step size taken", yscale="log", title=f"{row}: LR taken")
  for r in runs:
    if r["seed"] != 0 or r["kind"] != "lr_sweep" or analysis.opt_key(r) != r["optimizer"]:
      continue
    if r["lr"] is not None and not math.isclose(r["lr"], lr, rel_tol=1e-3):
      continue
    t = r["trajectory"]
    axes[2].plot(t["step"], t["loss"], color=COLORS.get(r["optimizer"]),
                 label=optimizers.LABELS.get(r["optimizer"], r["optimizer"]))
  axes[2].set(xlabel="step", ylabel="train batch loss", yscale="log",
              title=f"loss curves at base LR {lr:g} (LR-free at their own)")
  axes[2].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def band_heatmap(summary: dict[str, Any], title: str, path: pathlib.Path) -> pathlib.Path:
  """Worst-over-base-LR test accuracy on the (center, width) grid of bands."""
  rows = summary["rows"]
  centers = sorted({round(r["center"], 3) for r in rows})
  widths = sorted({round(r["width"], 3) for r in rows})
  grid = np.full((len(widths), len(centers)), np.nan)
  for r in rows:
    grid[widths.index(round(r["width"], 3)), centers.index(round(r["center"], 3))] = r["worst"]
  fig, ax = plt.subplots(figsize=(1.1 * len(centers) + 2, 0.8 * len(widths) + 2))
  good = grid[np.isfinite(grid) & (grid > 0.5)]
  vmin = float(good.min()) - 0.005 if good.size else None  # colour the useful range; 0 = dead
  im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto", vmin=vmin)
  for i in range(len(widths)):
    for j in range(len(centers)):
      if np.isfinite(grid[i, j]):
        ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7, color="k",
                bbox={"facecolor": "w", "alpha": 0.6, "lw": 0, "pad": 1})
  ax.set_xticks(range(len(centers)), [f"{c:g}" for c in centers])
  ax.set_yticks(range(len(widths)), [f"{w:g}" for w in widths])
  ax.set(xlabel="band center sqrt(lo*hi)", ylabel="band width hi/lo",
         title=f"{title}\nworst over base LRs of mean test acc; best {summary['recommended']}")
  fig.colorbar(im, ax=ax)
  return _save(fig, path)
