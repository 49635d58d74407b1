"""Sweeps of runs with resume: one JSON per run, skipped if present unless ``force``."""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Iterable, Sequence

from tqdm.auto import tqdm

from benchmarks import optimizers, results_io, tasks, train

Band = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Job:
  loss: str
  optimizer: str
  lr: float | None
  seed: int
  band: Band | None


def lr_jobs(losses: Iterable[str], opts: Iterable[str], lrs: Sequence[float],
            seeds: Sequence[int], band: Band | None = None) -> list[Job]:
  """The base-LR sweep: swept optimizers at every LR, LR-free ones once per seed."""
  jobs = []
  kband = tuple(band) if band else optimizers.DEFAULT_BAND
  for loss, name, seed in itertools.product(losses, opts, seeds):
    band = kband if name in optimizers.KSTEP else None
    if name in optimizers.LR_FREE:
      jobs.append(Job(loss, name, None, seed, None))
    else:
      jobs.extend(Job(loss, name, lr, seed, band) for lr in lrs)
  return jobs


def band_grid(centers: Sequence[float], widths: Sequence[float]) -> list[Band]:
  """Bands with geometric center ``c = sqrt(lo·hi)`` and width ``w = hi/lo``."""
  return [(round(c / w**0.5, 4), round(c * w**0.5, 4)) for c in centers for w in widths]


def band_jobs(losses: Iterable[str], bands: Sequence[Band], lrs: Sequence[float],
              seeds: Sequence[int], optimizer: str = "kstep") -> list[Job]:
  return [Job(loss, optimizer, lr, seed, band)
          for loss, band, lr, seed in itertools.product(losses, bands, lrs, seeds)]


def run_jobs(task: str, scale: str, jobs: list[Job], *, root: pathlib.Path,
             data_dir: str | None, steps: int | None = None, batch_size: int | None = None,
             force: bool = False, kind: str = "lr_sweep") -> dict[str, int]:
  """Runs every job not already on disk; returns counts of ``ran`` and ``skipped``."""
  problems: dict[str, tasks.Problem] = {}
  runners: dict[tuple[str, str], train.Runner] = {}
  todo, skipped = [], 0
  steps = steps or tasks.defaults(task, scale).steps
  for job in jobs:
    path = results_io.run_path(root, task, scale, job.loss, job.optimizer, job.lr, job.seed,
                               job.band, steps)
    if path.exists() and not force:
      skipped += 1
    else:
      todo.append((job, path))
  bar = tqdm(todo, desc=f"{task} {kind}", unit="run", disable=not todo)
  for job, path in bar:
    bar.set_postfix_str(f"{job.loss} {job.optimizer} lr={job.lr} seed={job.seed}")
    if job.loss not in problems:
      problems[job.loss] = tasks.load(task, job.loss, scale=scale, data_dir=data_dir,
                                      steps=steps, batch_size=batch_size)
    problem = problems[job.loss]
    key = (job.loss, job.optimizer)
    if key not in runners:
      runners[key] = train.Runner(problem, job.optimizer)
    result = runners[key].run(job.lr, job.seed, job.band,
                              progress=problem.steps * problem.batch_size >= 200_000)
    results_io.save_json(path, {
        "task": task, "scale": problem.scale, "scale_key": scale, "loss": job.loss,
        "optimizer": job.optimizer, "optimizer_label": optimizers.LABELS[job.optimizer],
        "lr": job.lr, "seed": job.seed, "band": job.band, "kind": kind,
        "config": {"steps": problem.steps, "batch_size": problem.batch_size,
                   "momentum": optimizers.MOMENTUM, "num_train": len(problem.x_train),
                   "num_test": len(problem.x_test), "notes": problem.notes},
        "env": results_io.environment(), **result,
    })
  return {"ran": len(todo), "skipped": skipped}
