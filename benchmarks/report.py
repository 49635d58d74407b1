"""Turns a task's run JSONs into ``summary_<scale>_<loss>.json`` and the PNG plots."""

from __future__ import annotations

import pathlib
from typing import Any

from benchmarks import analysis, plots, results_io


def report(root: pathlib.Path, task: str, scale: str, losses, steps: int) -> dict[str, Any]:
  out = {}
  for loss in losses:
    runs = results_io.load_runs(root, task, scale, loss, steps)
    if not runs:
      continue
    label = runs[0]["scale"]
    title = f"{task} ({label}), loss={loss}, {steps} steps, batch {runs[0]['config']['batch_size']}"
    head = analysis.headline(runs)
    bands = analysis.band_summary(runs)
    files = []
    if head["table"]:
      png = root / task / f"{scale}_{loss}_lr_sweep.png"
      files.append(plots.lr_sweep(head["table"], title, png))
      lr = float(head["per_optimizer"].get("cosine", {}).get("best_lr", 0.1))
      files.append(plots.trajectories(runs, lr, title,
                                      root / task / f"{scale}_{loss}_trajectories.png"))
    if bands:
      files.append(plots.band_heatmap(bands, title, root / task / f"{scale}_{loss}_bands.png"))
    summary = {"task": task, "scale": label, "loss": loss, "steps": steps,
               "num_runs": len(runs), "device": runs[0]["env"], "notes": runs[0]["config"]["notes"],
               "headline": head, "bands": bands, "plots": [p.name for p in files]}
    results_io.save_json(root / task / f"summary_{scale}_{loss}.json", summary)
    out[loss] = summary
  return out


def print_summary(summary: dict[str, Any]) -> None:
  for loss, s in summary.items():
    h = s["headline"]
    print(f"== {s['task']} ({s['scale']}) loss={loss}: {s['num_runs']} runs")
    for name, v in h["per_optimizer"].items():
      print(f"  {name:14s} best {v['best_acc']:.4f} @ {v['best_lr']:>6s}  worst "
            f"{v['worst_acc']:.4f} @ {v['worst_lr']:>6s}  diverged at {v['diverged_lrs']}")
    for name, v in h["lr_free"].items():
      print(f"  {name:14s} {v['mean']:.4f} ± {v['std']:.4f} (LR-free)")
    for key in ("lr_robustness", "parity"):
      if key in h:
        print(f"  {key}: holds={h[key]['holds']}  " + ", ".join(
            f"{k}={v}" for k, v in h[key].items() if k not in ("claim", "holds")))
    if s["bands"]:
      print(f"  band sweep: recommended {s['bands']['recommended']} "
            f"(worst {s['bands']['rows'][0]['worst']:.4f})")


def markdown(summary: dict[str, Any]) -> str:
  """A markdown table of one task's summaries (pasted into benchmarks/README.md)."""
  lines = ["| loss | optimizer | test acc, best (base LR) | worst (base LR) | diverged at |",
           "|---|---|---|---|---|"]
  for loss, s in summary.items():
    h = s["headline"]
    for name, v in h["per_optimizer"].items():
      lines.append(f"| {loss} | {name} | {v['best_acc']:.4f} ({v['best_lr']}) | "
                   f"{v['worst_acc']:.4f} ({v['worst_lr']}) | "
                   f"{', '.join(v['diverged_lrs']) or '-'} |")
    for name, v in h["lr_free"].items():
      lines.append(f"| {loss} | {name} (LR-free) | {v['mean']:.4f} ± {v['std']:.4f} | - | - |")
  return "\n".join(lines)
