"""``python -m benchmarks``: K-controlled SGD against optax baselines (see benchmarks/README.md)."""

from __future__ import annotations

import argparse
import os
import pathlib

from benchmarks import optimizers, results_io, tasks


def _floats(s: str) -> list[float]:
  return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x]


def _strs(s: str) -> list[str]:
  return [x for x in s.split(",") if x]


def _common(p: argparse.ArgumentParser, task: bool = True) -> None:
  if task:
    p.add_argument("task", choices=tasks.TASKS)
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: the CPU configs (cifar: reduced ResNet); gpu: full ResNet-18")
    p.add_argument("--losses", type=_strs, default=None, help="comma list of mse,ce")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data-dir", default=results_io.default_data_dir(),
                   help="folder with mnist.npz / cifar10_subset.npz (default $KSTEP_DATA)")
  p.add_argument("--results-dir", type=pathlib.Path, default=results_io.RESULTS_DIR)
  p.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  sub = parser.add_subparsers(dest="cmd", required=True)

  p = sub.add_parser("run", help="base-LR sweep of every optimizer, then report")
  _common(p)
  p.add_argument("--optimizers", type=_strs, default=list(optimizers.ALL),
                 help=f"comma list of {','.join(optimizers.ALL)}")
  p.add_argument("--lrs", type=_floats, default=None, help="comma list of base LRs")
  p.add_argument("--seeds", type=_ints, default=None)
  p.add_argument("--band", type=_floats, default=None,
                 help="lo,hi band of the kstep optimizers (default 0.4,0.8); a non-default band "
                      "is reported as e.g. kstep[2.5-4]")
  p.add_argument("--quick", action="store_true",
                 help="small demo sweep: mse, 4 optimizers, 3 LRs, 1 seed")
  p.add_argument("--no-report", action="store_true")

  p = sub.add_parser("bands", help="band sweep (center x width grid) of k_controlled_sgd")
  _common(p)
  p.add_argument("--centers", type=_floats, default=[0.2, 0.4, 0.8, 1.6, 3.2, 6.4])
  p.add_argument("--widths", type=_floats, default=[1.5, 2.0, 4.0], help="hi/lo ratios")
  p.add_argument("--lrs", type=_floats, default=None,
                 help="base LRs the band must cope with (default: the task's, e.g. 1e-3,3)")
  p.add_argument("--seeds", type=_ints, default=None)
  p.add_argument("--no-report", action="store_true")

  p = sub.add_parser("report", help="summaries and plots from the JSONs already on disk")
  _common(p)
  p.add_argument("--markdown", action="store_true", help="also print a markdown results table")

  p = sub.add_parser("overhead", help="steps/s of k_controlled_sgd vs optax.sgd, interleaved")
  _common(p)
  p.add_argument("--every", type=_ints, default=[1, 10, 100])
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--chunk", type=int, default=200, help="steps per timed chunk")

  p = sub.add_parser("linreg", help="Figure 1 of the K paper: K vs eta and SGD divergence")
  _common(p, task=False)
  p.add_argument("--etas", type=_floats, default=None)
  p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
  p.add_argument("--steps", type=int, default=10_000)
  return parser


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  cache = os.environ.get("KSTEP_BENCH_JAX_CACHE", os.path.expanduser("~/.cache/kstep-bench-jax"))
  if cache != "off":
    import jax

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if args.cmd == "linreg":
    from benchmarks import linreg

    linreg.main(args)
    return
  if args.cmd == "overhead":
    from benchmarks import overhead

    overhead.main(args)
    return
  from benchmarks import report, sweep

  d = tasks.defaults(args.task, args.scale)
  steps = args.steps or d.steps
  losses = args.losses or list(d.losses)
  if args.cmd == "run":
    opts, lrs, seeds = args.optimizers, args.lrs or list(d.lrs), args.seeds or list(d.seeds)
    if args.quick:
      losses = args.losses or ["mse"]
      opts = ["cosine", "kstep", "prodigy", "schedule_free"] if args.optimizers == list(
          optimizers.ALL) else opts
      lrs, seeds = args.lrs or [0.01, 0.1, 1.0], args.seeds or [0]
    jobs = sweep.lr_jobs(losses, opts, lrs, seeds, tuple(args.band) if args.band else None)
    counts = sweep.run_jobs(args.task, args.scale, jobs, root=args.results_dir,
                            data_dir=args.data_dir, steps=steps, batch_size=args.batch_size,
                            force=args.force)
    print(f"runs: {counts['ran']} ran, {counts['skipped']} skipped (already on disk)")
  elif args.cmd == "bands":
    bands = sweep.band_grid(args.centers, args.widths)
    jobs = sweep.band_jobs(losses, bands, args.lrs or list(d.band_lrs),
                           args.seeds or list(d.band_seeds))
    counts = sweep.run_jobs(args.task, args.scale, jobs, root=args.results_dir,
                            data_dir=args.data_dir, steps=steps, batch_size=args.batch_size,
                            force=args.force, kind="band_sweep")
    print(f"runs: {counts['ran']} ran, {counts['skipped']} skipped (already on disk)")
  if args.cmd == "report" or not args.no_report:
    summary = report.report(args.results_dir, args.task, args.scale, losses, steps)
    report.print_summary(summary)
    if getattr(args, "markdown", False):
      print(report.markdown(summary))


if __name__ == "__main__":
  main()
