"""Parity of a trial's kstep_anneal runs against the repo's best cosine and a reference trial.

Run from the repo root: python benchmarks/results/trials/refresh_every8/compare.py TRIAL [REF]
(REF: another results dir whose kstep_anneal runs to compare at the same base LRs; default the
repo's). Runs are read and averaged over seeds as the report does
(:func:`benchmarks.results_io.load_runs`, :func:`benchmarks.analysis.lr_table`: a diverged run
counts as 0 accuracy).
"""

import pathlib
import sys

sys.path.insert(0, ".")
from benchmarks import analysis, results_io  # noqa: E402

MAIN = pathlib.Path("benchmarks/results")


def accuracies(root, task, loss, b, opt):
  """``{lr: mean test accuracy over seeds}`` of ``opt`` in ``root`` (empty if none ran)."""
  table = analysis.lr_table(results_io.load_runs(pathlib.Path(root), task, "cpu", loss,
                                                 batch_size=b))
  return {lr: v["test_acc"]["mean"] for lr, v in table.get(opt, {}).items()}


def main(trial, ref=MAIN):
  for task in ["digits_mlp", "mnist_mlp", "cifar10_resnet18"]:
    for loss in ["mse", "ce"]:
      for b in [64, 256, 1024]:
        t = accuracies(trial, task, loss, b, "kstep_anneal")
        if not t:
          continue
        best = max(accuracies(MAIN, task, loss, b, "cosine").values(), default=float("nan"))
        m = accuracies(ref, task, loss, b, "kstep_anneal")
        tw, mw = min(t.values()), min(m[lr] for lr in t if lr in m)
        print(f"{task:17s} {loss:3s} B={b:4d} lrs={len(t):2d} best_cos={best:.4f} "
              f"trial worst={tw:.4f} gap={100 * (tw - best):+.2f}  "
              f"ref(same lrs) worst={mw:.4f} gap={100 * (mw - best):+.2f}")


if __name__ == "__main__":
  main(*sys.argv[1:])
