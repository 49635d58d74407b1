"""Sweeps of runs with resume: one JSON per run, skipped if present unless ``force`` (which
reruns it and moves the old JSON to ``<root>/superseded/``)."""

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
  band: Band | None  # kstep rows: None = the controller's default band
  batch_size: int | None = None  # None: the task's default


def lr_jobs(losses: Iterable[str], opts: Iterable[str], lrs: Sequence[float],
            seeds: Sequence[int], band: Band | None = None,
            batch_sizes: Sequence[int | None] = (None,)) -> list[Job]:
  """The base-LR sweep: swept optimizers at every LR, LR-free ones once per seed, at every
  batch size."""
  jobs = []
  kband = tuple(band) if band else None
  for b, loss, name, seed in itertools.product(batch_sizes, losses, opts, seeds):
    band = kband if name in optimizers.KSTEP else None
    if name in optimizers.LR_FREE:
      jobs.append(Job(loss, name, None, seed, None, b))
    else:
      jobs.extend(Job(loss, name, lr, seed, band, b) for lr in lrs)
  return jobs


def band_grid(centers: Sequence[float], widths: Sequence[float]) -> list[Band]:
  """Bands with geometric center ``c = sqrt(lo·hi)`` and width ``w = hi/lo``."""
  return [(round(c / w**0.5, 4), round(c * w**0.5, 4)) for c in centers for w in widths]


def band_jobs(losses: Iterable[str], bands: Sequence[Band], lrs: Sequence[float],
              seeds: Sequence[int], opts: Sequence[str] = ("kstep",),
              batch_sizes: Sequence[int | None] = (None,)) -> list[Job]:
  return [Job(loss, name, lr, seed, band, b)
          for b, loss, name, band, lr, seed in itertools.product(batch_sizes, losses, opts, bands,
                                                                 lrs, seeds)]


def run_jobs(task: str, scale: str, jobs: list[Job], *, root: pathlib.Path,
             data_dir: str | None, steps: int | None = None, force: bool = False,
             kind: str = "lr_sweep", kstep_kwargs: dict | None = None) -> dict[str, int]:
  """Runs every job not already on disk (``force``: every job; a JSON it replaces is moved to
  ``root/superseded/``); returns counts of ``ran`` and ``skipped``.

  ``kstep_kwargs``: extra ``k_controlled_sgd`` arguments for the kstep rows (a trial)."""
  problems: dict[tuple[str, int], tasks.Problem] = {}
  runners: dict[tuple, train.Runner] = {}
  todo, skipped = [], 0
  d = tasks.defaults(task, scale)
  steps = steps or d.steps
  for job in jobs:
    b = job.batch_size or d.batch_size
    path = results_io.run_path(root, task, scale, job.loss, job.optimizer, job.lr, job.seed,
                               job.band, steps, b)
    if path.exists() and not force:
      skipped += 1
    else:
      todo.append((job, b, path))
  bar = tqdm(todo, desc=f"{task} {kind}", unit="run", disable=not todo)
  for job, b, path in bar:
    bar.set_postfix_str(f"{job.loss} B={b} {job.optimizer} lr={job.lr} seed={job.seed}")
    if (job.loss, b) not in problems:
      problems[(job.loss, b)] = tasks.load(task, job.loss, scale=scale, data_dir=data_dir,
                                           steps=steps, batch_size=b)
    problem = problems[(job.loss, b)]
    key = (job.loss, b, job.optimizer, job.band is not None)
    if key not in runners:
      runners[key] = train.Runner(problem, job.optimizer, banded=job.band is not None,
                                  kstep_kwargs=kstep_kwargs)
    result = runners[key].run(job.lr, job.seed, job.band,
                              progress=problem.steps * problem.batch_size >= 200_000)
    config = {"steps": problem.steps, "batch_size": problem.batch_size,
              "momentum": optimizers.MOMENTUM, "num_train": len(problem.x_train),
              "num_test": len(problem.x_test), "notes": problem.notes}
    if job.optimizer in optimizers.KSTEP:
      band = job.band if job.band is not None else (kstep_kwargs or {}).get("target")
      config["kstep"] = optimizers.kstep_config(job.optimizer, tasks.KSTEP_LOSS[job.loss],
                                                band, problem.steps)
      config["kstep"]["kwargs"] = dict(kstep_kwargs or {})
    if path.exists():  # --force: the old JSON is kept under root/superseded/, not deleted
      results_io.supersede(root, path)
    results_io.save_json(path, {
        "task": task, "scale": problem.scale, "scale_key": scale, "loss": job.loss,
        "optimizer": job.optimizer, "optimizer_label": optimizers.LABELS[job.optimizer],
        "lr": job.lr, "seed": job.seed, "band": job.band, "kind": kind, "config": config,
        "env": results_io.environment(), **result,
    })
  return {"ran": len(todo), "skipped": skipped}
