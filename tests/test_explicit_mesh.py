"""kstep under an explicit-sharding mesh (``AxisType.Explicit``), on 8 simulated CPU devices.

The simulated devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX
starts, and this process has started JAX already with one device, so the cases
(tests/explicit_mesh_cases.py: λ_max's vectors keep the params' sharding, states keep their types
through init and jitted updates, values against dense references) run in a pytest process of
their own (about 20 s on 2 CPU cores).
"""

import os
import pathlib
import subprocess
import sys

import pytest

CASES = pathlib.Path(__file__).with_name("explicit_mesh_cases.py")


@pytest.mark.slow
def test_explicit_mesh_cases_on_8_simulated_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", str(CASES)],
      cwd=CASES.parents[1], env=env, capture_output=True, text=True, timeout=600,
  )
  summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
  assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
  assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
