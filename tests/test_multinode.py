"""Data-parallel training across two Ray nodes on this machine: a head started with
``ray start --head`` and a second node with ``ray start --address``, one CPU each, so a
2-worker DDP trial must put one worker on each. Its result equals the same trial on one
node, and the driver reads the trial's checkpoint and files from ``--storage-path`` (the
shared folder a real multi-node cluster needs)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sweeps" / "baseline.py"
RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(not Path(RAY).exists(), reason="no ray CLI on PATH")]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(cwd: Path, data: Path) -> dict[str, str]:
    env = dict(os.environ, QSWEEP_CACHE=str(cwd / "cache"), QSWEEP_DATA=str(data),
               RAY_AUTH_MODE="disabled")
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    return env


def _sweep(cwd: Path, data: Path, address: str, storage: Path) -> str:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke-test", "--num-samples", "1",
         "--num-workers", "2", "--cpus-per-worker", "1", "--address", address,
         "--storage-path", str(storage)],
        cwd=cwd, env=_env(cwd, data), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _start_node(args: list[str], env: dict[str, str], sessions: list[int]) -> None:
    """``ray start ...`` in a session of its own (its daemons stay in it), noted in
    ``sessions`` at once, to stop exactly this node by (``ray stop`` would stop every Ray
    on the machine), also when the start fails."""
    proc = subprocess.Popen([RAY, "start", "--num-cpus", "1", "--disable-usage-stats",
                             *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sessions.append(proc.pid)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]


def _stop_sessions(sessions: list[int]) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) in sessions:
                os.kill(int(entry.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(sessions: list[int]) -> list[int]:
    """Processes of those sessions still running (zombies waiting for init to reap them
    do not count), after up to 10 s for the SIGKILLs to land."""
    deadline = time.time() + 10
    while True:
        alive = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.getsid(int(entry.name)) in sessions and \
                        (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(int(entry.name))
            except (OSError, IndexError):
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


def test_ddp_across_two_nodes_equals_one_node(tmp_path: Path, tiny_root: Path) -> None:
    current = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    if current.exists():
        pytest.skip(f"{current} exists: a `ray start` cluster may be running here")
    head = f"127.0.0.1:{_port()}"
    env = _env(tmp_path, tiny_root)
    sessions: list[int] = []
    try:
        _start_node(["--head", "--port", head.split(":")[1],
                     "--dashboard-port", str(_port())], env, sessions)
        _start_node(["--address", head], env, sessions)
        nodes = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(address='" + head + "', "
             "logging_level='ERROR'); print(sum(n['Alive'] and n['Resources'].get('CPU') "
             "== 1 for n in ray.nodes()))"],
            env=env, capture_output=True, text=True, timeout=120)
        assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]
        _sweep(tmp_path, tiny_root, head, tmp_path / "shared")
    finally:
        _stop_sessions(sessions)
        current.unlink(missing_ok=True)  # ours (it did not exist): what `ray stop` removes
    assert not _alive(sessions), "the two nodes left processes running"
    _sweep(tmp_path, tiny_root, "local", tmp_path / "one-node")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("baseline").experiment_id
    trials = client.search_runs([exp], "tags.phase = 'search'",
                                order_by=["attributes.start_time ASC"])
    two_nodes, one_node = [r for r in trials if "trial_id" in r.data.tags]
    for key in ("train_loss", "test_acc", "val_acc", "test_loss"):
        assert two_nodes.data.metrics[key] == pytest.approx(one_node.data.metrics[key],
                                                            abs=1e-6), key
    # The driver found the trial's files in the shared --storage-path.
    logged = {a.path for a in client.list_artifacts(two_nodes.info.run_id)}
    assert {"config.yaml", "curves.png", "checkpoint"} <= logged
    assert list((tmp_path / "shared").glob("baseline-*/trial_*/train-*/checkpoint_*"))
