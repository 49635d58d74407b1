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

CASES = pathlib.Path(__file__).with_name("multidevice_cases.py")
EXAMPLE = CASES.parents[1] / "examples" / "data_parallel.py"


def test_multidevice_cases_pass_on_8_simulated_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
      cwd=CASES.parents[1], env=env, capture_output=True, text=True, timeout=1500,
  )
  summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
  assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
  assert " passed" in summary and "skipped" not in summary, summary


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


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
