"""Smoke test of the benchmarks CLI: a tiny digits sweep writes JSON + PNG and resumes."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo root

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import __main__ as cli  # noqa: E402

ARGS = ["run", "digits_mlp", "--optimizers", "cosine,kstep", "--lrs", "0.1", "--seeds", "0",
        "--steps", "50", "--losses", "mse"]


def test_digits_sweep_writes_results_and_resumes(tmp_path, capsys):
  cli.main(ARGS + ["--results-dir", str(tmp_path)])
  out = capsys.readouterr().out
  assert "2 ran, 0 skipped" in out
  runs = sorted((tmp_path / "digits_mlp" / "runs" / "cpu" / "mse").glob("*/*.json"))
  assert [p.parent.name for p in runs] == ["cosine", "kstep"]
  run = json.loads(runs[1].read_text())
  assert run["optimizer"] == "kstep" and run["lr"] == 0.1 and run["band"] == [0.4, 0.8]
  assert run["config"]["steps"] == 50 and run["summary"]["steps_done"] == 50
  assert {"platform", "device_kind", "jax", "optax", "command", "date"} <= set(run["env"])
  assert 0.0 <= run["summary"]["test_acc"] <= 1.0
  assert len(run["trajectory"]["k"]) == len(run["trajectory"]["step"]) > 0
  assert (tmp_path / "digits_mlp" / "cpu_mse_lr_sweep.png").stat().st_size > 0
  assert (tmp_path / "digits_mlp" / "summary_cpu_mse.json").exists()

  cli.main(ARGS + ["--results-dir", str(tmp_path), "--no-report"])
  assert "0 ran, 2 skipped" in capsys.readouterr().out


def test_help_lists_commands(capsys):
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  out = capsys.readouterr().out
  for cmd in ("run", "bands", "report", "overhead", "linreg"):
    assert cmd in out
