"""A full disk while trials write their checkpoints (the README's bad-input row): a real
sweep (``sweeps/baseline.py`` in a subprocess, embedded Ray, SQLite MLflow) whose
``--storage-path`` is a real filesystem with no space left: a tmpfs mounted for the test
and filled up (needs root and mount; skipped otherwise).

The sweep must stop at the first such failure (before: every trial started, failed and
was retried, then a traceback), say so in one line naming the folder with the command that
resumes it, exit 1, and end its runs KILLED (nothing RUNNING, nothing lost: the MLflow
store is elsewhere). With space freed (the tmpfs grown), that command finishes the sweep
in the same runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sweeps" / "baseline.py"
ARGS = ["--smoke-test", "--num-samples", "3", "--address", "local"]

pytestmark = pytest.mark.ray


def _mount(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(path: Path) -> None:
    """Write until the filesystem refuses (tmpfs: 4 KiB pages): no byte left."""
    subprocess.run(["dd", "if=/dev/zero", f"of={path / 'filler'}", "bs=4k"],
                   capture_output=True)
    assert os.statvfs(path).f_bavail == 0


def _sweep(cwd: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, QSWEEP_CACHE=str(cwd / "cache"), QSWEEP_DATA=str(data))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(SCRIPT), *ARGS, *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=400)


def test_a_full_disk_stops_the_sweep_says_so_and_resumes_once_freed(
        tmp_path: Path, tiny_root: Path) -> None:
    full = tmp_path / "full"
    if not _mount(full, "1m"):
        pytest.skip("needs root and `mount -t tmpfs` to make a real full disk")
    try:
        (full / "reserve").write_bytes(b"\0" * 256 * 1024)
        _fill(full)
        # Full before it starts: one line naming the file, nothing started or tracked.
        out = _sweep(tmp_path, tiny_root, "--storage-path", str(full))
        assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-4000:]
        assert out.stderr.strip().splitlines()[-1].startswith(
            f"error: no space left on device writing {full}/"), out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert "RUNNING" not in {r.info.status for r in client.search_runs(
            [e.experiment_id for e in client.search_experiments()])}

        # 256 KiB free: the sweep starts, its first checkpoint (1.6 MB) does not fit.
        (full / "reserve").unlink()
        out = _sweep(tmp_path, tiny_root, "--storage-path", str(full))
        assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-4000:]
        last = out.stderr.strip().splitlines()[-2:]
        assert last[0].startswith("error: no space left on device while a trial wrote its "
                                  "checkpoint (OSError: [Errno 28]"), out.stderr[-3000:]
        assert f"free: {full} 0.0 MiB, " in last[0]  # which disk: the full one, at 0
        assert "Free space on the full disk, then resume with:" in last[0]
        run_id = re.fullmatch(r"\s*python .*baseline\.py .*--resume ([0-9a-f]{32})",
                              last[1]).group(1)

        parent = client.get_run(run_id)
        assert parent.info.status == "KILLED"
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{run_id}'")
        assert children and {r.info.status for r in children} == {"KILLED"}
        assert all("a disk is full" in r.data.tags["mlflow.note.content"] for r in children)

        subprocess.run(["mount", "-o", "remount,size=64m", str(full)], check=True)
        resumed = _sweep(tmp_path, tiny_root, "--storage-path", str(full), "--resume", run_id)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
        assert client.get_run(run_id).info.status == "FINISHED"
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{run_id}'")
        assert len(children) == 3  # one run per trial: the stopped ones went on in theirs
        for run in children:  # each trained to its end, or ASHA stopped it: none lost
            assert run.info.status == "FINISHED" or (
                run.info.status == "KILLED" and "stopped_early" in run.data.tags), run.data.tags
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
