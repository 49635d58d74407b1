"""Turns a task's run JSONs into results: the parity headline, per-optimizer tables, summaries
(``summary_<scale>_<loss>_B<batch>.json``), PNG plots and the README's markdown table.

Results are grouped by loss and batch size. The text report reads as a result: first one parity
sentence per (loss, B), then each group's table of test accuracies (3 decimals) with the base LR
they came from and the divergences.
"""

from __future__ import annotations

import collections
import math
import pathlib
from typing import Any

from benchmarks import analysis, optimizers, plots, results_io


def fmt_lr(lr: Any) -> str:
  """``1e-4``, ``3e-3``, ``0.01``, ``0.3``, ``3`` (``free`` stays ``free``)."""
  try:
    x = float(lr)
  except (TypeError, ValueError):
    return str(lr)
  if x < 0.01:
    m, e = f"{x:.0e}".split("e")
    return f"{m}e{int(e)}"
  return f"{x:g}"


def fmt_lrs(lrs: list[str]) -> str:
  return ", ".join(fmt_lr(lr) for lr in lrs) or "none"


def _range(lrs: list[str]) -> str:
  if not lrs:
    return "no base LRs"
  n = len(lrs)
  span = fmt_lr(lrs[0]) if n == 1 else f"{fmt_lr(lrs[0])}…{fmt_lr(lrs[-1])}"
  return f"{n} base LR{'s' if n > 1 else ''} {span}"


def _machine(env: dict[str, Any]) -> str:
  kind, platform = env.get("device_kind", "?"), env.get("platform", "?")
  where = f"{kind}" if kind == platform else f"{kind} ({platform})"
  return f"{where}, {env.get('cpu_count', '?')} CPU cores"


def _name(name: str) -> str:
  """Table name: ``kstep (annealed)``, ...; a run at a given band keeps ``kstep[lo-hi]``."""
  return name if "[" in name else optimizers.SHORT.get(name, name)


def report(root: pathlib.Path, task: str, scale: str, losses, steps: int,
           batch_sizes=None, plot: bool = True) -> dict[str, Any]:
  """Summaries of ``task`` per (loss, batch size) found on disk (``batch_sizes``: only those);
  writes ``summary_<scale>_<loss>_B<B>.json`` and the plots next to the runs."""
  out = {}
  for loss in losses:
    by_b: dict[int, list] = collections.defaultdict(list)
    for r in results_io.load_runs(root, task, scale, loss, steps):
      by_b[int(r["config"]["batch_size"])].append(r)
    for b in sorted(by_b):
      if batch_sizes and b not in batch_sizes:
        continue
      runs = by_b[b]
      label = runs[0]["scale"]
      title = f"{task} ({label}), loss={loss}, B={b}, {steps} steps"
      head = analysis.headline(runs)
      bands = analysis.band_summary(runs)
      files = []
      stem = f"{scale}_{loss}_B{b}"
      if plot and head["table"]:
        files.append(plots.lr_sweep(head["table"], title, root / task / f"{stem}_lr_sweep.png"))
        lr = float(head["per_optimizer"].get("cosine", {}).get("best_lr", 0.1))
        files.append(plots.trajectories(runs, lr, title, root / task / f"{stem}_trajectories.png"))
      for name, bs in bands.items() if plot else ():
        files.append(plots.band_heatmap(bs, f"{title}, {name}",
                                        root / task / f"{stem}_{name}_bands.png"))
      envs = sorted((r["env"] for r in runs), key=lambda e: str(e.get("date", "")))
      commands = list(dict.fromkeys(e.get("command", "?") for e in envs))
      summary = {"task": task, "scale": label, "scale_key": scale, "loss": loss,
                 "batch_size": b, "steps": steps, "num_runs": len(runs),
                 "seeds": sorted({r["seed"] for r in runs}), "device": envs[-1],
                 "machines": sorted({_machine(e) for e in envs}), "commands": commands,
                 "dates": [envs[0].get("date"), envs[-1].get("date")],
                 "notes": runs[0]["config"]["notes"], "headline": head, "bands": bands,
                 "plots": [p.name for p in files]}
      results_io.save_json(root / task / f"summary_{stem}.json", summary)
      out[f"{loss}_B{b}"] = summary
  return out


def _pts(gap: float) -> str:
  """A gap in points to 0.1, or to 0.01 where 0.1 would hide which side of the −0.5 bar it is."""
  p = 100.0 * gap
  return f"{p:+.2f}" if round(p, 1) == -0.5 else f"{p:+.1f}"


def _verdict(p: dict[str, Any]) -> str:
  if p["holds"]:
    return "holds (bar: −0.5 point)"
  n, m = len(p["lrs_failing"]), len(p["kstep_lrs"])
  per_lr = ", ".join(f"{fmt_lr(lr)}: {_pts(p['kstep_acc_per_lr'][lr] - p['cosine_best'])}"
                     for lr in p["lrs_failing"])
  return f"fails at {n} of {m} base LRs ({per_lr} points; bar: −0.5)"


def _diverged(lrs: list[str]) -> str:
  return f"diverged at base LR {fmt_lrs(lrs)}" if lrs else "never diverged"


def headline_lines(s: dict[str, Any]) -> list[str]:
  """The parity sentence of one (loss, B) group, with its verdict and the numbers behind it."""
  p = s["headline"].get("parity")
  tag = f"{s['loss']} B={s['batch_size']}"
  if p is None:
    return [f"{tag}: parity not measured (needs cosine and kstep_anneal or kstep runs)"]
  k_row = _name(p["kstep_row"])
  lines = [f"{tag}: {p['sentence']} — {_verdict(p)}",
           f"    {k_row} {p['kstep_worst']:.3f} (base LR {fmt_lr(p['kstep_worst_lr'])}) to "
           f"{p['kstep_best']:.3f} (base LR {fmt_lr(p['kstep_best_lr'])}) over "
           f"{_range(p['kstep_lrs'])}, {_diverged(p['kstep_diverged_lrs'])}; best cosine "
           f"{p['cosine_best']:.3f} at LR {fmt_lr(p['cosine_best_lr'])} (over "
           f"{_range(p['cosine_lrs'])}, {_diverged(p['cosine_diverged_lrs'])})"]
  if "warmup_cosine_best" in p:
    g = p["gap_vs_warmup_cosine_points"]
    lines.append(f"    vs best warmup-cosine {p['warmup_cosine_best']:.3f} at LR "
                 f"{fmt_lr(p['warmup_cosine_best_lr'])}: {abs(g):.1f} points "
                 f"{'above' if g >= 0 else 'below'}")
  return lines


ORDER = ("cosine", "warmup_cosine", "kstep_anneal", "kstep_warmup", "kstep", "schedule_free", "sgd",
         "kstep_cosine")
FREE_ORDER = ("prodigy", "dog", "polyak_sgd")


def _sorted(names, order):
  rank = {n: i for i, n in enumerate(order)}
  return sorted(names, key=lambda n: (rank.get(n.split("[")[0], len(order)), n))


def group_table(s: dict[str, Any]) -> list[str]:
  """One group's per-optimizer lines: best and worst mean test accuracy, divergences."""
  h = s["headline"]
  seeds = len(s["seeds"])
  lines = [f"== {s['task']} ({s['scale']}), loss {s['loss']}, B={s['batch_size']}, "
           f"{s['steps']} steps, {seeds} seed{'s' if seeds > 1 else ''} ({s['num_runs']} runs)",
           f"  {'optimizer':28s}{'best (base LR)':>16s}{'worst (base LR)':>17s}   "
           f"{'base LRs':22s}diverged at"]
  for name in _sorted(h["per_optimizer"], ORDER):
    v = h["per_optimizer"][name]
    lines.append(f"  {_name(name):28s}{v['best_acc']:9.3f} ({fmt_lr(v['best_lr']):>4s})"
                 f"{v['worst_acc']:10.3f} ({fmt_lr(v['worst_lr']):>4s})   "
                 f"{_range(v['lrs'])[:21]:22s}{fmt_lrs(v['diverged_lrs'])}")
  for name in _sorted(h["lr_free"], FREE_ORDER):
    v = h["lr_free"][name]
    div = f"{v['diverged']} of {v['n']} seeds" if v["diverged"] else "none"
    acc = (f"{v['mean']:9.3f} ± {v['std']:.3f}" if v["n"] > 1
           else f"{v['mean']:9.3f} (1 seed)")
    lines.append(f"  {_name(name) + ' (LR-free)':28s}{acc:33s}   {'-':22s}{div}")
  for name, b in s["bands"].items():
    lines.append(f"  band sweep ({_name(name)}): best worst-case band {b['recommended']} "
                 f"({b['rows'][0]['worst']:.3f})")
  return lines


def format_report(summary: dict[str, Any]) -> str:
  """The text report: parity sentences first, then each group's table."""
  if not summary:
    return "no runs found"
  first = next(iter(summary.values()))
  lines = [f"{first['task']} ({first['scale']}), {first['steps']} steps: "
           "kstep at its defaults vs the best tuned cosine"]
  for s in summary.values():
    lines += ["  " + line for line in headline_lines(s)]
  for s in summary.values():
    lines += [""] + group_table(s)
  machines = sorted({m for s in summary.values() for m in s["machines"]})
  lines += ["", f"machine: {'; '.join(machines)}"]
  return "\n".join(lines)


def print_summary(summary: dict[str, Any]) -> None:
  print(format_report(summary))


def _lr_free_best(h: dict[str, Any]) -> str:
  if not h["lr_free"]:
    return "-"
  name, v = max(h["lr_free"].items(), key=lambda kv: kv[1]["mean"])
  return f"{v['mean']:.3f} ({_name(name)})"


def markdown(summaries: list[dict[str, Any]] | dict[str, Any]) -> str:
  """The README's results table over one or more tasks' summaries, then commands and machines."""
  if isinstance(summaries, dict):
    summaries = [summaries]
  lines = ["| task | loss | B | seeds | best cosine (LR) | kstep annealed, worst / best over base "
           "LRs | parity gap | kstep constant band, worst / best | LR-free best | diverged |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  commands: dict[str, list[str]] = {}
  machines: set[str] = set()
  for summary in summaries:
    for s in summary.values():
      h = s["headline"]
      per = h["per_optimizer"]
      c = per.get("cosine")
      cos = f"{c['best_acc']:.3f} ({fmt_lr(c['best_lr'])})" if c else "-"

      def wb(name):
        v = per.get(name)
        return f"{v['worst_acc']:.3f} / {v['best_acc']:.3f}" if v else "-"

      p = h.get("parity")
      gap = f"{_pts(p['margin'])} pt ({'holds' if p['holds'] else 'fails'})" if p else "-"
      div = "; ".join(f"{_name(n)} at {fmt_lrs(v['diverged_lrs'])}" for n, v in per.items()
                      if v["diverged_lrs"] and n.split("[")[0] in optimizers.PARITY) or "none"
      task = f"{s['task']} ({s['scale']})"
      lines.append(f"| {task} | {s['loss']} | {s['batch_size']} | {len(s['seeds'])} | {cos} | "
                   f"{wb('kstep_anneal')} | {gap} | {wb('kstep')} | {_lr_free_best(h)} | "
                   f"{div} |")
      commands.setdefault(task, [])
      commands[task] += [c for c in s["commands"] if c not in commands[task]]
      machines.update(s["machines"])
  lines.append("")
  for task, cmds in commands.items():
    lines.append(f"{task}: " + "; ".join(f"`{c}`" for c in cmds))
  lines.append("")
  lines.append(f"Machine: {'; '.join(sorted(machines))}.")
  return "\n".join(lines)


def accuracy_gap(summary: dict[str, Any], key: str) -> float:
  """The unrounded parity margin of one group (for tests and scripts); NaN without one."""
  p = summary[key]["headline"].get("parity")
  return p["margin"] if p else math.nan
