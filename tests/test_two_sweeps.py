"""A researcher starts a second sweep while another one's embedded Ray runs on the same
machine. Measured before the fix: the second sweep's data-parallel (Ray Train V2) trial
printed "ConnectionError: Found multiple active Ray instances" from its
PlacementGroupCleaner (Ray's state API looked for "the" local cluster and found two)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOLDER = """
import ray, sys, time
ray.init(num_cpus=1, include_dashboard=False)
print("first cluster up", flush=True)
time.sleep(float(sys.argv[1]))
"""

pytestmark = pytest.mark.ray


def test_a_ddp_sweep_beside_another_embedded_cluster(tmp_path: Path, tiny_root: Path) -> None:
    log = tmp_path / "first.log"
    first = subprocess.Popen([sys.executable, "-c", HOLDER, "1800"], cwd=tmp_path,
                             stdout=log.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while "first cluster up" not in log.read_text():
            assert first.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        env = dict(os.environ, QSWEEP_CACHE=str(tmp_path / "cache"),
                   QSWEEP_DATA=str(tiny_root))
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("RAY_API_SERVER_ADDRESS", None)
        out = subprocess.run([sys.executable, str(ROOT / "sweeps" / "baseline.py"),
                              "--smoke-test", "--num-samples", "1", "--num-workers", "2",
                              "--cpus-per-worker", "0.5"],
                             cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=400)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text[-3000:]
        assert "=== sweep finished ===" in out.stdout
        assert "multiple active Ray instances" not in text, text[-3000:]
        assert first.poll() is None  # the other cluster was up all along
    finally:
        os.killpg(first.pid, signal.SIGKILL)
