"""Where results live, what every JSON records about the machine, and run-level resume/skip.

Two folders: :data:`RUNS_DIR` (``benchmarks/runs/``, git-ignored) holds the raw JSONs, one per
run, that ``run``, ``bands`` and ``overhead`` write; :data:`RESULTS_DIR` (``benchmarks/results/``,
committed) holds what ``report`` makes of them: per task ``summary.md``, ``summary.csv`` and
the plots, and the combined ``parity.md``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any

import jax
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
RUNS_DIR = HERE / "runs"  # raw per-run JSONs (git-ignored)
RESULTS_DIR = HERE / "results"  # committed summaries and plots
SUPERSEDED = "superseded"  # RUNS_DIR/superseded/<same layout>: runs replaced by a rerun


def is_default_runs_dir(path: pathlib.Path) -> bool:
  return pathlib.Path(path).resolve() == RUNS_DIR


def summary_dir(runs_dir: pathlib.Path, out: pathlib.Path | None = None) -> pathlib.Path:
  """Where ``report`` writes: ``out`` if given, else :data:`RESULTS_DIR` for the default runs
  folder and the runs folder itself for any other (a trial, a test's tmp dir)."""
  if out is not None:
    return pathlib.Path(out)
  return RESULTS_DIR if is_default_runs_dir(runs_dir) else pathlib.Path(runs_dir)


def supersede(root: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  """Moves the run JSON ``path`` (under ``root``) to ``root/superseded/`` at the same relative
  path (``.1``, ``.2``, ... appended where one is already there); returns where it went."""
  dst = root / SUPERSEDED / path.relative_to(root)
  n = 0
  while dst.exists():
    n += 1
    dst = (root / SUPERSEDED / path.relative_to(root)).with_suffix(f".{n}.json")
  dst.parent.mkdir(parents=True, exist_ok=True)
  path.replace(dst)
  return dst


def default_data_dir() -> str | None:
  return os.environ.get("KSTEP_DATA")


def _git() -> dict[str, Any]:
  """The repository's commit and whether its tree had uncommitted changes (None outside git)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip()
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain",
                                                                 "--", "kstep", "benchmarks"))}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def environment() -> dict[str, Any]:
  """Machine and software facts recorded in every JSON."""
  dev = jax.devices()[0]
  return {
      "device_kind": dev.device_kind,
      "platform": dev.platform,
      "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "git": _git(),
      "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _fmt(x: float) -> str:
  return f"{x:.4g}"


def band_tag(band: tuple[float, float] | None, optimizer: str = "") -> str:
  """``lo-hi``; no band is ``default`` for the kstep rows (the controller's own) else ``none``."""
  if band is None:
    return "default" if optimizer.startswith("kstep") else "none"
  return f"{_fmt(band[0])}-{_fmt(band[1])}"


def run_path(root: pathlib.Path, task: str, scale: str, loss: str, optimizer: str,
             lr: float | None, seed: int, band: tuple[float, float] | None,
             steps: int, batch_size: int) -> pathlib.Path:
  """One JSON per run, keyed by task/scale/loss/optimizer/lr/seed/band/batch size/steps."""
  lr_tag = "free" if lr is None else _fmt(lr)
  name = (f"lr={lr_tag}_seed={seed}_band={band_tag(band, optimizer)}_B={batch_size}"
          f"_steps={steps}.json")
  return root / task / "runs" / scale / loss / optimizer / name


def clean(x: Any) -> Any:
  """JSON-safe copy: arrays to lists, floats rounded to 5 significant digits, NaN/Inf to str."""
  if isinstance(x, dict):
    return {str(k): clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [clean(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return clean(np.asarray(x).tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    if not math.isfinite(x):
      return str(x)
    return float(f"{x:.5g}")
  return x


def unclean(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: unclean(v) for k, v in x.items()}
  if isinstance(x, list):
    return [unclean(v) for v in x]
  if x in ("nan", "inf", "-inf"):
    return float(x)
  return x


def save_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(clean(payload), separators=(",", ":")))
  tmp.replace(path)


def load_json(path: pathlib.Path) -> dict[str, Any]:
  return unclean(json.loads(path.read_text()))


def _date(run: dict[str, Any]) -> str:
  """The run's UTC date (ISO 8601, so newer sorts later); the file's mtime where none."""
  return str(run.get("env", {}).get("date", "") or run.get("_mtime", ""))


def run_key(run: dict[str, Any]) -> tuple:
  """What identifies a run: two JSONs with the same key are the same experiment."""
  band = run.get("band")
  return (run["optimizer"], run["lr"], run["seed"], None if band is None else tuple(band),
          run["config"]["steps"], run["config"]["batch_size"])


def load_runs(root: pathlib.Path, task: str, scale: str, loss: str, steps: int | None = None,
              batch_size: int | None = None) -> list[dict[str, Any]]:
  """Every run JSON of one task/scale/loss (optionally only those with ``steps`` steps and
  batch size ``batch_size``). Several JSONs of the same experiment (:func:`run_key`: files
  written before the batch size entered the file name, or copied in under another name): the
  newest by ``env.date`` is kept."""
  base = root / task / "runs" / scale / loss
  runs = []
  for p in sorted(base.glob("*/*.json")):
    run = load_json(p)
    if not run.get("env", {}).get("date"):
      run["_mtime"] = datetime.datetime.fromtimestamp(
          p.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    runs.append(run)
  if steps is not None:
    runs = [r for r in runs if r["config"]["steps"] == steps]
  if batch_size is not None:
    runs = [r for r in runs if r["config"]["batch_size"] == batch_size]
  newest: dict[tuple, dict[str, Any]] = {}
  for r in runs:
    key = run_key(r)
    if key not in newest or _date(r) > _date(newest[key]):
      newest[key] = r
  return list(newest.values())
