"""The sweep script as a user runs it: help, bad input before any Ray work, a smoke run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

SCRIPT = Path(__file__).resolve().parent.parent / "sweeps" / "baseline.py"


def run(args: list[str], cwd: Path, data: Path | None = None, timeout: int = 300,
        script: Path = SCRIPT) -> subprocess.CompletedProcess:
    env = dict(os.environ, QSWEEP_CACHE=str(cwd / "cache"))
    env.pop("MLFLOW_TRACKING_URI", None)
    if data is not None:
        env["QSWEEP_DATA"] = str(data)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help(tmp_path: Path) -> None:
    out = run(["--help"], tmp_path)
    assert out.returncode == 0
    for flag in ("--num-samples", "--max-concurrent", "--smoke-test", "--set", "--data-root"):
        assert flag in out.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--set", "optim.lr=-1"], ["optim.lr", "-1", "> 0"]),
    (["--set", "model.name=vgg"], ["model.name", "lenet"]),
    (["--num-samples", "0"], ["num_samples", ">= 1"]),
    (["--epochs", "0"], ["train.epochs", ">= 1"]),
    (["--max-failures", "-2"], ["max_failures=-2", ">= -1"]),
    (["--set", "train.init_from=nowhere"],
     ["train.init_from=", "nowhere' is invalid: allowed a checkpoint folder holding state.pt"]),
])
def test_bad_input_fails_fast_with_the_field(tmp_path: Path, tiny_root: Path, args: list[str],
                                             fragments: list[str]) -> None:
    out = run(args, tmp_path, tiny_root, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in out.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_data_says_which_files_under_which_root(tmp_path: Path) -> None:
    out = run([], tmp_path, tmp_path / "empty", timeout=60)
    assert out.returncode == 2
    assert "MNIST/raw/train-images-idx3-ubyte" in out.stderr and "empty" in out.stderr
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.ray
def test_smoke_test_runs_and_prints_the_summary(tmp_path: Path, tiny_root: Path) -> None:
    out = run(["--smoke-test", "--num-samples", "2", "--address", "local"], tmp_path,
              tiny_root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best trial" in out.stdout and "test_acc" in out.stdout
    assert f"python -m sweeps.ui --tracking-uri sqlite:///{tmp_path / 'mlflow.db'}" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("baseline")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3 and all(r.info.status in ("FINISHED", "KILLED") for r in runs)


def test_flags_yaml_and_overrides_compose_in_order(tmp_path: Path) -> None:
    from sweeps.cli import base_config, common_parser

    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.2\n  momentum: 0.5\nmodel.name: mlp\n")
    parser = common_parser("t", num_samples=4, max_concurrent=2, epochs=3)
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--set", "optim.lr=0.3",
                              "--epochs", "5", "--num-workers", "2", "--gpus-per-trial", "0.5",
                              "--address", "ray://head:10001",
                              "--data-root", "/data"])
    cfg = base_config(args, ["model.name=lenet", "optim.lr=0.1"], ["train.epochs=1"])
    assert cfg.model.name == "mlp" and cfg.optim.momentum == 0.5  # file over defaults
    assert cfg.optim.lr == 0.3  # --set over the file
    assert cfg.train.epochs == 5 and cfg.train.num_workers == 2
    assert cfg.train.use_gpu and cfg.train.gpus_per_worker == 0.5
    assert cfg.data.root == "/data"
    smoke = base_config(parser.parse_args(["--smoke-test"]), [], ["train.epochs=1"])
    assert smoke.train.epochs == 1  # the smoke test keeps its own short epochs


@pytest.mark.slow
def test_bad_config_files_and_a_dead_tracking_server_are_one_line_errors(
        tmp_path: Path, tiny_root: Path) -> None:
    (tmp_path / "broken.yaml").write_text("optim:\n  lr: [0.1\n")
    cases = [(["--config", "nope.yaml"], "config file 'nope.yaml' cannot be read"),
             (["--config", "broken.yaml"], "config file 'broken.yaml' is not valid YAML at"),
             (["--tracking-uri", "http://127.0.0.1:9"],
              "--tracking-uri http://127.0.0.1:9 does not answer")]
    for args, fragment in cases:
        start = time.time()
        out = run(["--smoke-test", *args], tmp_path, tiny_root, timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert fragment in out.stderr, out.stderr
        assert time.time() - start < 60
    assert not (tmp_path / "ray_results").exists()


def test_a_gpu_trial_without_any_gpu_stops_at_once(tmp_path: Path, tiny_root: Path) -> None:
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU: the trial could run")
    out = run(["--smoke-test", "--gpus-per-trial", "1"], tmp_path, tiny_root, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--gpus-per-trial 1.0 is invalid here: this machine has no GPU" in out.stderr


def test_a_trial_larger_than_the_embedded_cluster_stops_at_once(tmp_path: Path,
                                                                 tiny_root: Path) -> None:
    """Before: a 3-worker DDP trial on this 2-CPU machine never ended: Train's worker
    group start timed out every 60 s and was retried (still waiting after 8 minutes)."""
    from sweeps.ray_private import ray_num_cpus

    workers = ray_num_cpus() + 1
    start = time.time()
    out = run(["--smoke-test", "--num-workers", str(workers)], tmp_path, tiny_root, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (f"train.num_workers={workers} x train.cpus_per_worker=1 needs {workers} CPUs "
            f"per trial (Ray counts 1/10000 units); the embedded Ray cluster on this machine "
            f"has {workers - 1}") in out.stderr, out.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()
    # Compared in Ray's fixed-point units: 2/3 of a CPU is 6667 units, 3 x 6667 > 20000
    # (Ray would not place the third worker); the share the message suggests fits.
    from sweeps.cli import check_trial_fits, common_parser
    from trainables.config import ConfigError, TrialConfig

    args = common_parser("x", 1, 1, 1).parse_args(["--address", "local"])

    def trial(cpus: float) -> TrialConfig:
        return TrialConfig().with_overrides([f"train.num_workers={workers}",
                                             f"train.cpus_per_worker={cpus}"])

    with pytest.raises(ConfigError, match=r"needs 2.0001 CPUs per trial \(Ray counts"):
        check_trial_fits(args, trial((workers - 1) / workers))
    suggested = out.stderr.split("--cpus-per-worker ")[1].split(")")[0]
    check_trial_fits(args, trial(float(suggested)))
    assert float(suggested) * 1e4 == int(float(suggested) * 1e4)  # whole Ray units


@pytest.mark.slow
def test_resume_of_nothing_is_a_one_line_error_that_changes_nothing(
        tmp_path: Path, tiny_root: Path) -> None:
    from sweeps.tracking import SweepTracker

    out = run(["--smoke-test", "--resume"], tmp_path, tiny_root, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "no MLflow store at" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no empty store made for it

    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "baseline")
    done = tracker.start_sweep("baseline-done", tags={"kind": "search", "tune_folder": "x"})
    tracker.end_run(done, "FINISHED")
    cases = [([], "experiment 'baseline' has no unfinished sweep run to resume"),
             (["0123abcd"], "--resume 0123abcd is invalid: allowed the run id of a sweep run"),
             ([done], f"--resume {done} is invalid: that sweep finished")]
    for args, fragment in cases:
        out = run(["--smoke-test", "--resume", *args], tmp_path, tiny_root, timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert fragment in out.stderr, out.stderr
    assert tracker.client.get_run(done).info.status == "FINISHED"
    assert len(tracker.client.search_runs([tracker.experiment_id])) == 1
    assert not (tmp_path / "ray_results").exists()


def test_gpus_per_trial_auto_shares_the_clusters_gpus() -> None:
    from sweeps.cli import base_config, common_parser
    from sweeps.ray_env import gpu_share

    parser = common_parser("t", 4, 2, 3)
    assert parser.parse_args([]).gpus_per_trial == "auto"  # the default: ray submit uses GPUs
    assert parser.parse_args(["--gpus-per-trial", "0.5"]).gpus_per_trial == 0.5
    cfg = base_config(parser.parse_args([]), [], [])
    assert not cfg.train.use_gpu  # auto is sized once Ray is up, not here
    # (total GPUs, trials at once, workers per trial) -> GPUs per worker
    assert gpu_share(0, 2, 1) == 0.0  # no GPU: CPU trials
    assert gpu_share(1, 4, 1) == 0.25 and gpu_share(1, 3, 1) == pytest.approx(1 / 3)
    assert gpu_share(2, 3, 1) == 0.5  # 2/3 does not divide a GPU: the largest 1/k that fits
    assert gpu_share(8, 4, 2) == 1.0 and gpu_share(4, 2, 1) == 1.0  # whole GPUs, not more
    # A DDP trial's ranks need a GPU each (NCCL refuses two on one): whole GPUs or CPU.
    assert gpu_share(1, 2, 2) == 0.0 and gpu_share(2, 4, 2) == 1.0


@pytest.mark.parametrize("value", ["many", "-1", "100"])
def test_gpus_per_trial_bad_values_name_the_flag(tmp_path: Path, value: str) -> None:
    out = run(["--gpus-per-trial", value], tmp_path, timeout=60)
    assert out.returncode == 2 and "--gpus-per-trial" in out.stderr
    assert "allowed auto or a number of GPUs per worker from 0 to 64" in out.stderr


@pytest.mark.ray
def test_a_dead_clusters_address_file_does_not_stop_a_sweep(tmp_path: Path,
                                                            tiny_root: Path) -> None:
    """`ray start` leaves /tmp/ray/ray_current_cluster; after a crash it names a dead
    cluster, which ray.init would try (and fail) to join: the sweep starts its own."""
    import tempfile

    current = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    if current.exists():
        pytest.skip(f"{current} exists: a Ray cluster may be running here")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text(f"127.0.0.1:{dead}")
    try:
        out = run(["--smoke-test", "--num-samples", "1"], tmp_path, tiny_root, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "=== sweep finished ===" in out.stdout
        gpu = run(["--smoke-test", "--gpus-per-trial", "1"], tmp_path, tiny_root, timeout=60)
        if not __import__("torch").cuda.device_count():
            assert gpu.returncode == 2 and "this machine has no GPU" in gpu.stderr
    finally:
        current.unlink()
