"""Data parallel on simulated CPU devices, each in processes of its own.

The simulated devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX
starts, and this process has started JAX already with one device; the rest of the suite stays on
one device. The 8-device cases live in tests/multidevice_cases.py; the two-process run is
examples/data_parallel.py under jax.distributed.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

CASES = pathlib.Path(__file__).with_name("multidevice_cases.py")
EXAMPLE = CASES.parents[1] / "examples" / "data_parallel.py"


# The default run's 8-device smoke subset (well under 30 s on 2 CPU cores): a trace on a sharded
# batch under jit (FSDP params, Hutchinson probes), the trace inside shard_map, and a few
# controller steps on a sharded batch against one device. The whole file (about 4 minutes on 2
# cores) runs under `-m slow`.
SMOKE_CASES = (
    "test_trace_jit_sharded_equals_single_device[softmax_cross_entropy-hutchinson-fsdp]",
    "test_trace_shard_map_equals_single_device[softmax_cross_entropy-hutchinson-True]",
    "test_controller_steps_sharded_equal_single_device",
    "test_adam_controller_sharded_equals_single_device",
)


def _run_cases(*selection: str, expected: int | None = None) -> None:
  """Runs tests/multidevice_cases.py (or the named cases of it) on 8 simulated devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  targets = [f"{CASES}::{case}" for case in selection] or [str(CASES)]
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", *targets],
      cwd=CASES.parents[1], env=env, capture_output=True, text=True, timeout=1500,
  )
  summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
  assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
  assert " passed" in summary and "skipped" not in summary, summary
  if expected is not None:
    assert summary.startswith(f"{expected} passed"), summary


def test_multidevice_smoke_on_8_simulated_devices():
  _run_cases(*SMOKE_CASES, expected=len(SMOKE_CASES))


@pytest.mark.slow
def test_multidevice_cases_pass_on_8_simulated_devices():
  _run_cases()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_example_on_two_processes_matches_one_device(tmp_path):
  """examples/data_parallel.py as a two-host run: two processes of 4 CPU devices each, joined by
  jax.distributed (gloo), each handing its own rows of every batch to the global arrays."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, str(EXAMPLE), "--steps", "12", "--batch-size", "64", "--n-train",
           "2048", "--no-timing", "--coordinator-address", f"localhost:{port}",
           "--num-processes", "2", "--process-id", str(i),
           "--result-json", str(tmp_path / f"result{i}.json")],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-5000:]
  results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
  for r in results:
    assert (r["num_devices"], r["num_processes"]) == (8, 2)
    assert r["max_param_rel_diff"] < 1e-4
    assert r["compilations"] == [1, 1]
    assert abs(r["final_loss"] - r["final_loss_one_device"]) <= 1e-5 * r["final_loss_one_device"]
    assert r["final_k"] > 0
  assert results[0]["final_loss"] == results[1]["final_loss"]



def test_example_speed_report_needs_several_devices():
  """On one device both runs of examples/data_parallel.py are the same computation: one rate,
  timed after the warm-up, and the reason there is no ratio (it printed "ratio 2.49" before)."""
  from conftest import load_example

  report = load_example("data_parallel").speed_report
  rates, lines = report(1, "cpu", 325.6, 131.0, 20)
  text = "\n".join(lines)
  assert rates == {"steps_per_s": 325.6}
  assert "ratio" not in text and "only one device" in text and "20 warm-up" in text
  rates, lines = report(8, "gpu", 300.0, 100.0, 20)
  assert rates == {"steps_per_s": 300.0, "steps_per_s_one_device": 100.0}
  assert "ratio 3.00" in lines[0] and len(lines) == 1
  assert "simulated" in report(8, "cpu", 300.0, 100.0, 20)[1][1]
