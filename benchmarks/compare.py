"""Whether two folders of run JSONs hold the same runs, number for number.

    python -m benchmarks.compare NEW_DIR REFERENCE_DIR

For every run JSON under ``NEW_DIR`` (``run``'s layout), the JSON at the same relative path
under ``REFERENCE_DIR`` must have equal summary numbers (test and train accuracy and loss,
divergence, steps) and equal trajectories, point for point (NaN equal to NaN). It prints how many
runs are identical and the first differences, and exits 1 if any differ or lack a reference. The
check behind "behaviour unchanged" after a refactor: rerun the parity rows at the new code into
``NEW_DIR`` and compare them with the runs of the old code.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

SUMMARY = ("test_acc", "test_loss", "train_acc", "train_loss", "diverged", "steps_done")


def differences(new: dict, ref: dict) -> list[str]:
  """What differs between two run JSONs (empty when identical)."""
  out = [f"summary.{k}: {new['summary'][k]} vs {ref['summary'][k]}" for k in SUMMARY
         if new["summary"].get(k) != ref["summary"].get(k)]
  for k in sorted(set(new["trajectory"]) | set(ref["trajectory"])):
    a = np.asarray(new["trajectory"].get(k, []), float)
    b = np.asarray(ref["trajectory"].get(k, []), float)
    if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True):
      out.append(f"trajectory.{k}")
  return out


def compare(new_root: pathlib.Path, ref_root: pathlib.Path) -> tuple[int, int, list[str]]:
  """``(identical, compared, problems)`` over the run JSONs under ``new_root``."""
  same = total = 0
  problems = []
  for path in sorted(new_root.rglob("*.json")):
    new = json.loads(path.read_text())
    if "summary" not in new or "trajectory" not in new:
      continue  # not a run JSON (a report summary, an overhead file)
    rel = path.relative_to(new_root)
    ref_path = ref_root / rel
    if not ref_path.exists():
      problems.append(f"{rel}: no reference")
      continue
    total += 1
    diff = differences(new, json.loads(ref_path.read_text()))
    same += not diff
    problems += [f"{rel}: {d}" for d in diff]
  return same, total, problems


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("new", type=pathlib.Path)
  p.add_argument("reference", type=pathlib.Path)
  args = p.parse_args(argv)
  same, total, problems = compare(args.new, args.reference)
  print(f"{same} of {total} runs identical (summary numbers and trajectories)")
  for line in problems[:20]:
    print(" ", line)
  return 0 if total and not problems else 1


if __name__ == "__main__":
  sys.exit(main())
