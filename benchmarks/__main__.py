"""``python -m benchmarks``: K-controlled SGD against optax baselines (see benchmarks/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from benchmarks import optimizers, results_io, tasks


def _floats(s: str) -> list[float]:
  return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x]


def _strs(s: str) -> list[str]:
  return [x for x in s.split(",") if x]


def _json_dict(s: str) -> dict:
  value = json.loads(s)
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
  return value


def _common(p: argparse.ArgumentParser, task: bool = True, batch_list: bool = True,
            results_dir: pathlib.Path = results_io.RUNS_DIR,
            task_choices: tuple[str, ...] = tasks.TASKS + tasks.LM_TASKS) -> None:
  if task:
    p.add_argument("task", choices=task_choices)
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: the CPU configs (cifar: reduced ResNet); gpu: full ResNet-18")
    p.add_argument("--losses", type=_strs, default=None, help="comma list of mse,ce")
    p.add_argument("--steps", type=int, default=None)
    if batch_list:
      p.add_argument("--batch-size", type=_ints, default=None,
                     help="comma list of batch sizes, e.g. 64,1024 (default: the task's); part "
                          "of every run's key")
    else:
      p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data-dir", default=results_io.default_data_dir(),
                   help="folder with mnist.npz / cifar10_subset.npz (default $KSTEP_DATA)")
  where = "benchmarks/" + results_dir.name
  p.add_argument("--results-dir", type=pathlib.Path, default=results_dir,
                 help=f"where the JSONs go (default {where}/)")
  p.add_argument("--force", action="store_true",
                 help="rerun runs whose JSON exists (run/bands: the old JSON moves to "
                      "<results-dir>/superseded/)")


def _optimizers(s: str) -> list[str]:
  names = list(optimizers.ALL) if s == "all" else _strs(s)
  unknown = [n for n in names if n not in optimizers.ALL]
  if unknown:
    raise argparse.ArgumentTypeError(f"unknown optimizers {unknown}; one of {optimizers.ALL}")
  return names


QUICK_OPTIMIZERS = ["cosine", "kstep_anneal", "kstep", "prodigy", "polyak_sgd"]
QUICK_LRS = [1e-3, 0.1, 3.0]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  sub = parser.add_subparsers(dest="cmd", required=True)

  p = sub.add_parser("run", help="base-LR sweep of every optimizer, then report")
  _common(p)
  p.add_argument("--optimizers", type=_optimizers, default=list(optimizers.PARITY),
                 help=f"comma list of {','.join(optimizers.ALL)}, or all (default: the parity "
                      f"rows {','.join(optimizers.PARITY)})")
  p.add_argument("--lrs", type=_floats, default=None,
                 help="comma list of base LRs (default 1e-4,3e-4,...,1,3)")
  p.add_argument("--seeds", type=_ints, default=None)
  p.add_argument("--band", type=_floats, default=None,
                 help="lo,hi band of the kstep optimizers (default: the controller's own); a "
                      "given band is reported as e.g. kstep[2.5-4]")
  p.add_argument("--kstep-kwargs", type=_json_dict, default=None,
                 help='JSON object of k_controlled_sgd arguments for the kstep rows, e.g. '
                      '\'{"guard": {"ratio": 0.7}}\' (a trial of the defaults; needs its own '
                      '--results-dir, recorded in each run JSON as config.kstep.kwargs)')
  p.add_argument("--quick", action="store_true",
                 help=f"small demo sweep: mse, {','.join(QUICK_OPTIMIZERS)}, base LRs "
                      f"{','.join(f'{x:g}' for x in QUICK_LRS)}, 1 seed")
  p.add_argument("--no-report", action="store_true",
                 help="do not print the report afterwards (run never writes summaries: "
                      "that is `report`)")

  p = sub.add_parser("bands", help="band sweep (center x width grid) of k_controlled_sgd")
  _common(p)
  p.add_argument("--optimizers", type=_strs, default=["kstep"],
                 help="comma list of kstep,kstep_anneal (the annealed band)")
  p.add_argument("--centers", type=_floats, default=[0.2, 0.4, 0.8, 1.6, 3.2, 6.4])
  p.add_argument("--widths", type=_floats, default=[1.5, 2.0, 4.0], help="hi/lo ratios")
  p.add_argument("--lrs", type=_floats, default=None,
                 help="base LRs the band must cope with (default: the task's, e.g. 1e-3,3)")
  p.add_argument("--seeds", type=_ints, default=None)
  p.add_argument("--no-report", action="store_true")

  p = sub.add_parser("report", help="parity headline and tables from the JSONs already on "
                                    "disk (one or more tasks); writes each task's summary.md, "
                                    "summary.csv and plots")
  p.add_argument("task", nargs="+", choices=tasks.TASKS)
  p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--losses", type=_strs, default=None, help="comma list of mse,ce")
  p.add_argument("--steps", type=int, default=None, help="default: each task's")
  p.add_argument("--batch-size", type=_ints, default=None,
                 help="only these batch sizes (default: every one on disk)")
  p.add_argument("--results-dir", type=pathlib.Path, default=results_io.RUNS_DIR,
                 help="where the run JSONs are read (default benchmarks/runs/)")
  p.add_argument("--out-dir", type=pathlib.Path, default=None,
                 help="where <task>/summary.md, summary.csv, the plots and parity.md go "
                      "(default benchmarks/results/; for another --results-dir, that folder)")
  p.add_argument("--markdown", action="store_true",
                 help="also print the combined parity table of the tasks given and write it to "
                      "<out-dir>/parity.md")
  p.add_argument("--no-plots", action="store_true", help="keep the plots already there")

  p = sub.add_parser("overhead", help="steps/s of k_controlled_sgd vs optax.sgd, interleaved")
  _common(p, batch_list=False,
          task_choices=tasks.TASKS + tasks.LM_TASKS + tasks.SYNTHETIC_TASKS)
  p.add_argument("--every", type=_ints, default=[1, 10, 100])
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--chunk", type=int, default=200, help="steps per timed chunk")
  p.add_argument("--variants", type=_strs, default=["fused", "fused1"],
                 help="comma list of one-argument changes at every=10: noguard, refresh1, "
                      "iters2, refresh4, probe8, probe16, probe32, wholebatch, nofloor, "
                      "bare (no guard, no floor), "
                      "bare16, noguard16; rare, rare_noguard: every=1000; bare1, bare1_probe4: "
                      "every=1, no guard, no floor, 16 or 4 rows; "
                      "fused, fused1: the fused path (kstep.value_and_grad) at every=10 and 1; "
                      "adam, adam1, adam_rare: k_controlled_adam at every=10, 1, 1000 against "
                      "optax.adamw (default: fused,fused1)")
  p.add_argument("--calls", choices=("scan", "step"), default="scan",
                 help="scan: each chunk one jitted lax.scan; step: one jitted step per Python "
                      "call (what most training loops do; dispatch costs show)")
  p.add_argument("--processes", type=int, default=1,
                 help="repeat the whole measurement in this many fresh processes, one after "
                      "another, and report the median and range of their medians (on a 2-core "
                      "CPU the same configuration's ratio moved by up to 0.08 between processes)")

  p = sub.add_parser("linreg", help="Figure 1 of the K paper: K vs eta and SGD divergence")
  _common(p, task=False, results_dir=results_io.RESULTS_DIR)
  p.add_argument("--etas", type=_floats, default=None)
  p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
  p.add_argument("--steps", type=int, default=10_000)
  return parser


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  cache = os.environ.get("KSTEP_BENCH_JAX_CACHE", os.path.expanduser("~/.cache/kstep-bench-jax"))
  # Not for `overhead`: executables loaded from JAX's persistent cache ran the controller's
  # every=10 step ~10 % slower on this 2-core CPU (MNIST MLP: 1.20 vs 1.09 x optax.sgd, the
  # same code and command, with and without KSTEP_BENCH_JAX_CACHE=off), and users compile
  # afresh (JAX's cache is off by default). It only saves compile time in accuracy sweeps.
  if cache != "off" and args.cmd != "overhead":
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

  if args.cmd == "report":
    summaries = []
    out = results_io.summary_dir(args.results_dir, args.out_dir)
    for task in args.task:
      d = tasks.defaults(task, args.scale)
      summary = report.report(args.results_dir, task, args.scale, args.losses or list(d.losses),
                              args.steps or d.steps, args.batch_size, plot=not args.no_plots,
                              out=out)
      report.print_summary(summary)
      print()
      summaries.append(summary)
    if args.markdown:
      table = report.markdown(summaries, command="python -m benchmarks " + " ".join(
          argv if argv is not None else sys.argv[1:]))
      print(table)
      out.mkdir(parents=True, exist_ok=True)
      (out / "parity.md").write_text(table + "\n")
    return

  d = tasks.defaults(args.task, args.scale)
  steps = args.steps or d.steps
  losses = args.losses or list(d.losses)
  batch_sizes = args.batch_size or [d.batch_size]
  if args.cmd == "run":
    opts, lrs, seeds = args.optimizers, args.lrs or list(d.lrs), args.seeds or list(d.seeds)
    if args.quick:
      losses = args.losses or ["mse"]
      opts = QUICK_OPTIMIZERS if args.optimizers == list(optimizers.PARITY) else opts
      lrs, seeds = args.lrs or QUICK_LRS, args.seeds or [0]
    jobs = sweep.lr_jobs(losses, opts, lrs, seeds, tuple(args.band) if args.band else None,
                         batch_sizes)
    if args.kstep_kwargs and results_io.is_default_runs_dir(args.results_dir):
      raise SystemExit("run: --kstep-kwargs trials need their own --results-dir (the default "
                       "one holds the runs at the controller's defaults)")
    counts = sweep.run_jobs(args.task, args.scale, jobs, root=args.results_dir,
                            data_dir=args.data_dir, steps=steps, force=args.force,
                            kstep_kwargs=args.kstep_kwargs)
  else:  # bands
    bad = [n for n in args.optimizers if n not in optimizers.KSTEP]
    if bad:
      raise SystemExit(f"bands: --optimizers must be kstep rows {optimizers.KSTEP}; got {bad}")
    bands = sweep.band_grid(args.centers, args.widths)
    jobs = sweep.band_jobs(losses, bands, args.lrs or list(d.band_lrs),
                           args.seeds or list(d.band_seeds), args.optimizers, batch_sizes)
    counts = sweep.run_jobs(args.task, args.scale, jobs, root=args.results_dir,
                            data_dir=args.data_dir, steps=steps, force=args.force,
                            kind="band_sweep")
  print(f"runs: {counts['ran']} ran, {counts['skipped']} skipped (already on disk)")
  if not args.no_report:
    print()
    summary = report.report(args.results_dir, args.task, args.scale, losses, steps, batch_sizes,
                            write=False)
    report.print_summary(summary)
    where = ("" if results_io.is_default_runs_dir(args.results_dir)
             else f" --results-dir {args.results_dir}")
    print(f"\n(summary.md, summary.csv and plots: python -m benchmarks report {args.task}{where})")


if __name__ == "__main__":
  main()
