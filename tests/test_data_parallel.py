"""Runs the 8-device data-parallel cases (tests/multidevice_cases.py) in their own process.

The simulated devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX
starts, and this process has started JAX already with one device; the rest of the suite stays on
one device.
"""

import os
import pathlib
import subprocess
import sys

CASES = pathlib.Path(__file__).with_name("multidevice_cases.py")


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
