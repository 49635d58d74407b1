"""Turns a task's run JSONs into results: the parity headline, per-optimizer tables, the
committed per-task summary (``summary.md``, ``summary.csv``, PNG plots) and the combined parity
table (``parity.md``).

Reads the raw JSONs under ``--results-dir`` (default ``benchmarks/runs/``) and writes to
``--out-dir`` (default ``benchmarks/results/``; for any other ``--results-dir`` that folder
itself). The machine-readable summary of each group, ``summary_<scale>_<loss>_B<B>.json``, stays
beside the raw JSONs. Results are grouped by loss and batch size. The text report reads as a
result: first one parity sentence per (loss, B), then each group's table of test accuracies (3
decimals) with the base LR they came from and the divergences.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import pathlib
import re
import shutil
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


def _provenance(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per optimizer row: the commits, dates and ``--kstep-kwargs`` its runs were made with."""
  out: dict[str, dict[str, Any]] = {}
  for r in runs:
    if r["kind"] != "lr_sweep":
      continue
    env = r.get("env", {})
    v = out.setdefault(analysis.opt_key(r), {"commits": [], "dates": [], "kwargs": []})
    commit = (env.get("git") or {}).get("commit")
    v["commits"].append(commit[:7] if commit else "?")
    v["dates"].append(str(env.get("date", ""))[:10])
    kw = json.dumps((r["config"].get("kstep") or {}).get("kwargs") or {}, sort_keys=True)
    v["kwargs"].append(kw)
  for v in out.values():
    v["commits"] = list(dict.fromkeys(sorted(v["commits"])))
    dates = sorted(d for d in v["dates"] if d)
    v["dates"] = [dates[0], dates[-1]] if dates else []
    v["kwargs"] = sorted(set(v["kwargs"]) - {"{}"})
  return out


def report(root: pathlib.Path, task: str, scale: str, losses, steps: int,
           batch_sizes=None, plot: bool = True, out: pathlib.Path | None = None,
           write: bool = True) -> dict[str, Any]:
  """Summaries of ``task`` per (loss, batch size) found under ``root`` (``batch_sizes``: only
  those). ``write``: saves ``summary_<scale>_<loss>_B<B>.json`` beside the runs and the task's
  ``summary.md``, ``summary.csv`` and plots under ``out`` (default
  :func:`results_io.summary_dir`); without it nothing is written."""
  out_task = results_io.summary_dir(root, out) / task
  result = {}
  written: list[pathlib.Path] = []
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
      if write and plot and head["table"]:
        files.append(plots.lr_sweep(head["table"], title, out_task / f"{stem}_lr_sweep.png"))
        lr = float(head["per_optimizer"].get("cosine", {}).get("best_lr", 0.1))
        files.append(plots.trajectories(runs, lr, title, out_task / f"{stem}_trajectories.png"))
      for name, bs in bands.items() if write and plot else ():
        files.append(plots.band_heatmap(bs, f"{title}, {name}",
                                        out_task / f"{stem}_{name}_bands.png"))
      if write and not plot:  # keep the plots already there
        files = sorted(out_task.glob(f"{stem}_*.png"))
      written += files
      envs = sorted((r["env"] for r in runs), key=lambda e: str(e.get("date", "")))
      commands = list(dict.fromkeys(_portable(e.get("command", "?")) for e in envs))
      summary = {"task": task, "scale": label, "scale_key": scale, "loss": loss,
                 "batch_size": b, "steps": steps, "num_runs": len(runs),
                 "seeds": sorted({r["seed"] for r in runs}), "device": envs[-1],
                 "machines": sorted({_machine(e) for e in envs}), "commands": commands,
                 "dates": [envs[0].get("date"), envs[-1].get("date")],
                 "notes": runs[0]["config"]["notes"], "headline": head, "bands": bands,
                 "provenance": _provenance(runs), "plots": [p.name for p in files]}
      if write:
        results_io.save_json(root / task / f"summary_{stem}.json", summary)
      result[f"{loss}_B{b}"] = summary
  if write:
    overhead = load_overhead(root, task, scale)
    for loss, payload in overhead.items():
      png = root / task / f"overhead_{scale}_{loss}.png"
      if png.exists():
        out_task.mkdir(parents=True, exist_ok=True)
        if png.resolve() != (out_task / png.name).resolve():
          shutil.copyfile(png, out_task / png.name)
        written.append(out_task / png.name)
    if plot:  # plots of groups no longer on disk (or renamed) go
      for stale in out_task.glob(f"{scale}_*.png"):
        if stale not in written:
          stale.unlink()
    if result or overhead:
      write_task_summary(out_task, task, scale, result, overhead, root)
  return result


def load_overhead(root: pathlib.Path, task: str, scale: str) -> dict[str, dict[str, Any]]:
  """``{loss: payload}`` of the task's ``overhead_<scale>_<loss>.json`` files under ``root``."""
  out = {}
  for loss in ("mse", "ce"):
    path = root / task / f"overhead_{scale}_{loss}.json"
    if path.exists():
      out[loss] = results_io.load_json(path)
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
  """The parity sentence of one (loss, B) group, with its verdict and the numbers behind it (and
  the Adam family's, where it ran)."""
  tag = f"{s['loss']} B={s['batch_size']}"
  a = s["headline"].get("adam_parity")
  adam = []
  if a is not None:
    adam = [f"{tag} Adam: k_controlled_adam's worst base LR {a['kstep_worst']:.3f} (base LR "
            f"{fmt_lr(a['kstep_worst_lr'])}) vs best AdamW cosine {a['cosine_best']:.3f} (LR "
            f"{fmt_lr(a['cosine_best_lr'])}): {_verdict(a)}"
            + (f"; prodigy {a['prodigy']:.3f}" if "prodigy" in a else "")]
  p = s["headline"].get("parity")
  if p is None:
    return adam or [f"{tag}: parity not measured (needs cosine and kstep_anneal or kstep runs)"]
  return _sgd_headline_lines(tag, p) + adam


def _sgd_headline_lines(tag: str, p: dict[str, Any]) -> list[str]:
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
         "kstep_cosine", "adamw_cosine", "adamw_warmup_cosine", "kstep_adam_anneal",
         "schedule_free_adamw")
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
  return f"{_name(name)} {v['mean']:.3f}" + ("" if v["n"] > 1 else " (1 seed)")


def _grid(h: dict[str, Any], name: str) -> str:
  """``seeds × base LRs`` of one optimizer row, e.g. ``3 × 10`` or ``1–3 × 10``."""
  entry = h["table"].get(name, {})
  if not entry:
    return "-"
  seeds = sorted({v["seeds"] for v in entry.values()})
  n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
  return f"{n} seed{'s' if seeds[-1] > 1 else ''}" if "free" in entry else f"{n} × {len(entry)}"


def _gap2(p: dict[str, Any] | None) -> str:
  """The parity gap in points to 0.01 with its verdict, e.g. ``−0.25 (holds)``."""
  if p is None:
    return "-"
  g = f"{100.0 * p['margin'] + 0.0:+.2f}".replace("-", "−")
  return f"{g} ({'holds' if p['holds'] else 'fails'})"


def _acc_lr(v: dict[str, Any], which: str) -> str:
  return f"{v[which + '_acc']:.3f} ({fmt_lr(v[which + '_lr'])})"


PARITY_HEADER = ["| task | loss | B | seeds | best tuned cosine (LR) | kstep annealed worst / best "
                 "over base LRs | kstep seeds × base LRs | gap, points | best LR-free |",
                 "|---|---|---|---|---|---|---|---|---|"]


def parity_row(s: dict[str, Any]) -> str:
  """One group's row of the combined parity table."""
  h = s["headline"]
  per = h["per_optimizer"]
  c = per.get("cosine")
  k = per.get("kstep_anneal")
  p = h.get("parity") if k else None
  kstep = f"{_acc_lr(k, 'worst')} / {_acc_lr(k, 'best')}" if k else "not run"
  return (f"| {s['task']} ({s['scale']}) | {s['loss']} | {s['batch_size']} | {len(s['seeds'])} | "
          f"{_acc_lr(c, 'best') if c else '-'} | {kstep} | {_grid(h, 'kstep_anneal')} | "
          f"{_gap2(p)} | {_lr_free_best(h)} |")


ADAM_HEADER = ["| task | loss | B | seeds | best tuned AdamW cosine (LR) | kstep Adam annealed "
               "worst / best over base LRs | kstep seeds × base LRs | gap, points | prodigy | "
               "kstep worst − prodigy, points |",
               "|---|---|---|---|---|---|---|---|---|---|"]


def adam_parity_row(s: dict[str, Any]) -> str | None:
  """One group's row of the Adam family's parity table (None where the family did not run)."""
  h = s["headline"]
  p = h.get("adam_parity")
  if p is None:
    return None
  per = h["per_optimizer"]
  c, k = per["adamw_cosine"], per[p["kstep_row"]]
  vs = f"{100.0 * p['vs_prodigy'] + 0.0:+.1f}".replace("-", "−") if "vs_prodigy" in p else "-"
  prodigy = f"{p['prodigy']:.3f}" if "prodigy" in p else "-"
  return (f"| {s['task']} ({s['scale']}) | {s['loss']} | {s['batch_size']} | {len(s['seeds'])} | "
          f"{_acc_lr(c, 'best')} | {_acc_lr(k, 'worst')} / {_acc_lr(k, 'best')} | "
          f"{_grid(h, p['kstep_row'])} | {_gap2(p)} | {prodigy} | {vs} |")


def adam_table(groups: list[dict[str, Any]]) -> list[str]:
  """The Adam family's parity table over ``groups`` (empty where none ran it)."""
  rows = [r for r in (adam_parity_row(s) for s in groups) if r is not None]
  if not rows:
    return []
  return ["## Adam family", "", *ADAM_HEADER, *rows, "",
          "Gap: k_controlled_adam annealed at its defaults, worst over base LRs 1e-5…0.1, minus "
          "the best tuned AdamW cosine (bar: −0.5 point); the last column compares the same "
          "worst base LR with prodigy (the issue's bar: ≥ 0).", ""]


def _portable(command: str) -> str:
  """A recorded command with this machine's paths replaced: ``--data-dir DATA``, ``--results-dir
  DIR``."""
  command = re.sub(r"--data-dir[ =]\S+", "--data-dir DATA", command)
  return re.sub(r"--results-dir[ =]\S+", "--results-dir DIR", command)


def markdown(summaries: list[dict[str, Any]] | dict[str, Any], command: str | None = None) -> str:
  """The combined parity table over one or more tasks' summaries (``parity.md``): one row per
  (task, loss, B), then how it was made and on which machines."""
  if isinstance(summaries, dict):
    summaries = [summaries]
  lines = list(PARITY_HEADER)
  machines: set[str] = set()
  dates: list[str] = []
  for summary in summaries:
    for s in summary.values():
      lines.append(parity_row(s))
      machines.update(s["machines"])
      dates += [d for d in s["dates"] if d]
  lines += ["", "Test accuracy after the task's steps, mean over seeds at each base LR (a diverged "
            "run counts as 0). Gap: kstep annealed's worst base LR minus the best tuned cosine; "
            "parity holds at ≥ −0.5 point. Per-task tables, per-LR values and plots: "
            "`benchmarks/results/<task>/summary.md`."]
  adam = adam_table([s for summary in summaries for s in summary.values()])
  if adam:
    lines += [""] + adam
  if command:
    lines += ["", f"Regenerate: `{command}` (from the run JSONs in `benchmarks/runs/`)."]
  if dates:
    lines += ["", f"Runs dated {min(dates)[:10]} to {max(dates)[:10]}."]
  lines += ["", f"Machine: {'; '.join(sorted(machines))}."]
  return "\n".join(lines)


def _ran_at(prov: dict[str, Any] | None) -> str:
  if not prov:
    return "-"
  commits = prov["commits"]
  at = ", ".join(commits) if len(commits) <= 3 else f"{len(commits)} commits"
  dates = prov["dates"]
  when = "" if not dates else (dates[0] if dates[0] == dates[1] else f"{dates[0]}…{dates[1]}")
  kw = "; ".join(f"`{k}`" for k in prov["kwargs"])
  return f"{at} ({when})" + (f", `--kstep-kwargs` {kw}" if kw else "")


def group_markdown(s: dict[str, Any], out_task: pathlib.Path) -> list[str]:
  """One (loss, B) group of ``summary.md``: per-optimizer table, band sweeps, plots."""
  h = s["headline"]
  prov = s.get("provenance", {})
  lines = [f"### {s['loss']}, B = {s['batch_size']}", "",
           f"{s['num_runs']} runs. " + " ".join(headline_lines(s)[:1]).split(": ", 1)[-1], "",
           "| optimizer | best (base LR) | worst (base LR) | seeds × base LRs | diverged at | "
           "ran at |", "|---|---|---|---|---|---|"]
  for name in _sorted(h["per_optimizer"], ORDER):
    v = h["per_optimizer"][name]
    lines.append(f"| {_name(name)} | {_acc_lr(v, 'best')} | {_acc_lr(v, 'worst')} | "
                 f"{_grid(h, name)} | {fmt_lrs(v['diverged_lrs'])} | {_ran_at(prov.get(name))} |")
  for name in _sorted(h["lr_free"], FREE_ORDER):
    v = h["lr_free"][name]
    div = f"{v['diverged']} of {v['n']} seeds" if v["diverged"] else "none"
    lines.append(f"| {_name(name)} (LR-free) | {v['mean']:.3f} ± {v['std']:.3f} | | "
                 f"{_grid(h, name)} | {div} | {_ran_at(prov.get(name))} |")
  for name, b in s["bands"].items():
    lines += ["", f"Band sweep ({_name(name)}): best worst-case band {b['recommended']} "
              f"({b['rows'][0]['worst']:.3f})."]
  pngs = [name for name in s["plots"] if (out_task / name).exists()]
  if pngs:
    lines += [""] + [f"![{name}]({name})" for name in pngs]
  return lines + [""]


def _overhead_label(name: str) -> str:
  """``kstep_every10`` -> ``every=10 (the defaults)``, ``kstep_every10_noguard`` -> ``every=10,
  noguard``."""
  m = re.fullmatch(r"kstep_every(\d+)(?:_(.+))?", name)
  if not m:
    return name
  every, variant = m.groups()
  if variant:
    return f"every={every}, {variant}"
  return f"every={every}" + (" (the defaults)" if every == "10" else "")


def overhead_markdown(overhead: dict[str, dict[str, Any]], scale: str) -> list[str]:
  """The overhead section of ``summary.md``: time per step over ``optax.sgd``, per loss."""
  losses = list(overhead)
  first = overhead[losses[0]]
  names: list[str] = []
  for payload in overhead.values():
    ratios = payload.get("time_ratio_vs_sgd_across_processes") or payload["time_ratio_vs_sgd"]
    names += [n for n in ratios if n not in names]
  head = " | ".join(f"{loss} (B = {overhead[loss]['batch_size']}) | guard share" for loss in losses)
  lines = ["## Overhead", "",
           "Time per step of `k_controlled_sgd` over `optax.sgd(0.01, momentum=0.9)` on the same "
           "batches, interleaved rounds; per process the median of the per-round ratios, then the "
           "median [min, max] over fresh processes (one process: [q25, q75] over rounds). Guard "
           "share: the fraction of estimates that ran the guard's power steps. "
           f"{first.get('defaults', '')}.", "",
           f"| configuration | {head} |", "|---|" + "---|---|" * len(losses)]
  for name in names:
    variant = first.get("variants", {}).get(name)
    label = _overhead_label(name)
    if variant:
      label += f" `{json.dumps(variant)}`"
    cells = []
    for loss in losses:
      p = overhead[loss]
      across = p.get("time_ratio_vs_sgd_across_processes")
      if across and name in across:
        v = across[name]
        cells.append(f"{v['median']:.3f} [{v['min']:.3f}, {v['max']:.3f}]")
      elif name in p["time_ratio_vs_sgd"]:
        v = p["time_ratio_vs_sgd"][name]
        cells.append(f"{v['median']:.3f} [{v['q25']:.3f}, {v['q75']:.3f}]")
      else:
        cells.append("-")
      share = p.get("guard_share_of_estimates", {}).get(name)
      cells.append("-" if share is None else f"{share:.2f}")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines.append("")
  for loss in losses:
    p = overhead[loss]
    across = p.get("time_ratio_vs_sgd_across_processes") or {}
    est = p.get("estimate_cost_in_steps_across_processes", p.get("estimate_cost_in_steps"))
    fused1 = across.get("kstep_every1_fused1", {}).get("median")
    sgd = p.get("sgd_us_per_step_per_process")
    env = p.get("env", {})
    commit = ((env.get("git") or {}).get("commit") or "?")[:7]
    n = p.get("processes", 1)
    parts = [f"{loss}: {n} process{'es' if n > 1 else ''} × {p['rounds']} rounds × "
             f"{p['chunk_steps']} steps"]
    if est is not None:
      parts.append(f"one estimate ≈ {est:.2f} SGD step" + (
          f" (fused: {fused1 - 1:.2f})" if fused1 is not None else ""))
    if sgd:
      parts.append(f"SGD step {min(sgd) / 1e3:.3g}–{max(sgd) / 1e3:.3g} ms")
    when = str(env.get("date", ""))[:10]
    parts.append(f"`{_portable(env.get('command', '?'))}` at {commit} ({when})")
    lines.append("* " + "; ".join(parts) + ".")
  pngs = [f"overhead_{scale}_{loss}.png" for loss in losses]
  lines += [""] + [f"![{name}]({name})" for name in pngs] + [""]
  return lines


def write_csv(path: pathlib.Path, summaries: dict[str, Any]) -> None:
  """Per (optimizer, loss, B, base LR): test accuracy mean ± std over seeds, and more."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["task", "scale", "loss", "batch_size", "steps", "optimizer", "base_lr", "seeds",
                "test_acc_mean", "test_acc_std", "train_loss_mean", "diverged_runs", "commits"])
    for s in summaries.values():
      table = s["headline"]["table"]
      prov = s.get("provenance", {})
      for name in _sorted(table, ORDER + FREE_ORDER):
        for lr in sorted(table[name], key=lambda x: -1.0 if x == "free" else float(x)):
          v = table[name][lr]
          loss = v["train_loss"]["mean"]
          w.writerow([s["task"], s["scale_key"], s["loss"], s["batch_size"], s["steps"], name,
                      lr, v["seeds"], f"{v['test_acc']['mean']:.4f}",
                      f"{v['test_acc']['std']:.4f}",
                      f"{loss:.4g}" if math.isfinite(loss) else "inf", v["diverged"],
                      " ".join(prov.get(name, {}).get("commits", []))])


def summary_names(scale: str) -> tuple[str, str]:
  """``summary.md``/``summary.csv`` for the CPU scale, ``summary_<scale>.*`` for another."""
  tag = "" if scale == "cpu" else f"_{scale}"
  return f"summary{tag}.md", f"summary{tag}.csv"


def write_task_summary(out_task: pathlib.Path, task: str, scale: str, summaries: dict[str, Any],
                       overhead: dict[str, dict[str, Any]], root: pathlib.Path) -> pathlib.Path:
  """Writes the task's ``summary.md`` and ``summary.csv`` into ``out_task``."""
  md_name, csv_name = summary_names(scale)
  out_task.mkdir(parents=True, exist_ok=True)
  where = (f"`benchmarks/runs/{task}/`" if results_io.is_default_runs_dir(root)
           else f"`{root / task}`")
  lines = [f"# {task}: benchmark summary ({scale})", "",
           f"Written by `python -m benchmarks report {task}"
           f"{'' if scale == 'cpu' else ' --scale ' + scale}` from the run JSONs in {where}; "
           "do not edit by hand.", ""]
  if summaries:
    first = next(iter(summaries.values()))
    dates = sorted(d for s in summaries.values() for d in s["dates"] if d)
    machines = sorted({m for s in summaries.values() for m in s["machines"]})
    lines += [f"{first['notes']}; {first['steps']} steps; momentum 0.9. Test accuracy: mean "
              "over seeds at each base LR (a diverged run counts as 0). Runs dated "
              f"{dates[0][:10]} to {dates[-1][:10]} on {'; '.join(machines)}. "
              f"Per base LR: `{csv_name}`.", "",
              "## Parity", "", *PARITY_HEADER]
    lines += [parity_row(s) for s in summaries.values()]
    lines += ["", "Gap: kstep annealed's worst base LR minus the best tuned cosine, points; "
              "parity holds at ≥ −0.5 point. \"ran at\": the commits (and dates) of the runs, "
              "with any `--kstep-kwargs` they were given.", ""]
    lines += adam_table(list(summaries.values()))
    for s in summaries.values():
      lines += group_markdown(s, out_task)
    commands: dict[str, int] = collections.Counter()
    for s in summaries.values():
      for c in s["commands"]:
        commands[c] += 1
    lines += ["Commands recorded in the JSONs, as run (a `--results-dir` marks runs made in a "
              "trial folder and copied in):", ""] + [f"* `{c}`" for c in commands] + [""]
  if overhead:
    lines += overhead_markdown(overhead, scale)
  path = out_task / md_name
  path.write_text("\n".join(lines).rstrip("\n") + "\n")
  write_csv(out_task / csv_name, summaries)
  return path


def accuracy_gap(summary: dict[str, Any], key: str) -> float:
  """The unrounded parity margin of one group (for tests and scripts); NaN without one."""
  p = summary[key]["headline"].get("parity")
  return p["margin"] if p else math.nan
