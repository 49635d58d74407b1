"""Parity of a trial's kstep_anneal runs against the repo's best cosine and a reference trial.

Run from the repo root: python benchmarks/results/trials/refresh_every8/compare.py TRIAL [REF]
(REF: another results dir whose kstep_anneal runs to compare at the same base LRs; default the
repo's). Mean over seeds per base LR; a diverged run counts as 0 accuracy.
"""

import collections
import glob
import json
import sys

import numpy as np

MAIN = "benchmarks/results"


def load(root, task, loss, opt, b):
  d = collections.defaultdict(list)
  for f in glob.glob(f"{root}/{task}/runs/cpu/{loss}/{opt}/*_B={b}_*.json"):
    r = json.load(open(f))
    d[r["lr"]].append(0.0 if r["summary"]["diverged"] else r["summary"]["test_acc"])
  return d


def main(trial, ref=MAIN):
  for task in ["digits_mlp", "mnist_mlp", "cifar10_resnet18"]:
    for loss in ["mse", "ce"]:
      for b in [64, 256, 1024]:
        t = load(trial, task, loss, "kstep_anneal", b)
        if not t:
          continue
        cos = load(MAIN, task, loss, "cosine", b)
        best = max(np.mean(v) for v in cos.values()) if cos else float("nan")
        m = load(ref, task, loss, "kstep_anneal", b)
        tw = min(np.mean(v) for v in t.values())
        mw = min(np.mean(m[lr]) for lr in t if lr in m)
        seeds = max(len(v) for v in t.values())
        print(f"{task:17s} {loss:3s} B={b:4d} lrs={len(t):2d} seeds={seeds} best_cos={best:.4f} "
              f"trial worst={tw:.4f} gap={100 * (tw - best):+.2f}  "
              f"ref(same lrs) worst={mw:.4f} gap={100 * (mw - best):+.2f}")


if __name__ == "__main__":
  main(*sys.argv[1:])
