"""SweepTracker against real stores: SQLite, and an MLflow server over http whose
artifacts must land in the server's artifact store, not on the client's disk."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sweeps.outcome import diverged, trial_status
from sweeps.provenance import environment_tags
from sweeps.tracking import SweepTracker, plot_curves, trial_metrics
from trainables.config import TrialConfig


def test_nested_runs_params_metrics_and_status_in_sqlite(tmp_path: Path) -> None:
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'm.db'}", "exp")
    parent = tracker.start_sweep("sweep", params={"sweep.num_samples": 2})
    child = tracker.start_trial("trial", TrialConfig().to_flat(), tags={"seed": "0"})
    for step, acc in ((1, 0.5), (2, 0.75)):
        tracker.log_metrics(child, {"test_acc": acc, "device": "cpu", "flag": True}, step)
    tracker.end_run(child, "KILLED")
    run = tracker.client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.status == "KILLED"
    assert run.data.params["optim.lr"] == str(TrialConfig().optim.lr)
    assert set(run.data.metrics) == {"test_acc"}  # strings and bools are not metrics
    history = tracker.client.get_metric_history(child, "test_acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    artifact_uri = tracker.client.get_run(child).info.artifact_uri
    assert artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_a_deleted_experiment_is_restored_not_lost(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    first = SweepTracker(uri, "exp")
    old_run = first.start_sweep("old")
    first.client.delete_experiment(first.experiment_id)
    second = SweepTracker(uri, "exp")
    second.start_sweep("new")
    assert second.experiment_id == first.experiment_id
    runs = second.client.search_runs([second.experiment_id])
    assert old_run in {r.info.run_id for r in runs} and len(runs) == 2


def test_environment_tags() -> None:
    tags = environment_tags()
    for key in ("git_sha", "hostname", "torch", "mlflow", "ray", "python"):
        assert tags[key]


def test_provenance_imports_no_ray() -> None:
    code = ("import sys, sweeps.provenance as p; p.environment_tags(); "
            "assert 'ray' not in sys.modules and 'mlflow' not in sys.modules, sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_numeric_metric_a_trial_reports_is_kept() -> None:
    result = {"test_acc": 0.9, "test_acc_lns4": 0.8, "packed_bytes": 1200, "device": "cpu",
              "training_iteration": 2, "time_this_iter_s": 1.0, "timestamp": 5, "pid": 7,
              "trial_id": "abc", "done": False, "time_total_s": 3.0}
    assert trial_metrics(result) == {"test_acc": 0.9, "test_acc_lns4": 0.8,
                                     "packed_bytes": 1200}


def test_one_rule_for_how_a_trial_ended() -> None:
    assert trial_status(3, 3) == "FINISHED" and trial_status(1, 3) == "KILLED"
    assert trial_status(3, 3, errored=True) == "FAILED"
    assert trial_status(0, 3, errored=True) == "FAILED"
    assert diverged([{"train_loss": 1.0}, {"train_loss": float("inf")}])
    assert not diverged([{"train_loss": 1.0}, {"test_acc": 0.1}])


def test_curves_png(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.1 / e, "train_acc": 0.5,
                "test_acc": 0.4 + 0.1 * e} for e in (1, 2, 3)]
    path = plot_curves(history, tmp_path / "c.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = _free_port()
    artifacts = tmp_path / "server-artifacts"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(artifacts)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield url, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_artifacts_go_to_the_http_server(mlflow_server, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url, server_artifacts = mlflow_server
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    monkeypatch.chdir(client_dir)
    tracker = SweepTracker(url, "served")
    tracker.start_sweep("sweep")
    child = tracker.start_trial("trial", {"optim.lr": 0.1}, tags={})
    tracker.log_text(child, "hello", "config.yaml")
    tracker.end_run(child, "FINISHED")
    stored = list(server_artifacts.rglob("config.yaml"))
    assert len(stored) == 1 and stored[0].read_text() == "hello"
    assert not any(client_dir.rglob("config.yaml"))  # nothing left on the client side
    assert tracker.client.get_run(child).info.status == "FINISHED"


def test_optuna_learns_from_a_diverged_trial_but_not_from_a_nan() -> None:
    """Why a diverged epoch reports its losses as +inf: Ray's OptunaSearch hands the value
    to Optuna, which keeps +inf as a (bad) result; a NaN is refused ("The value nan is
    not acceptable", logged by Ray) and that Optuna trial stays RUNNING, lost to TPE."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    def space(trial):
        trial.suggest_float("optim.lr", 0.1, 1.0)

    searcher = OptunaSearch(space=space, metric="val_loss", mode="min",
                            sampler=optuna.samplers.RandomSampler(seed=0))
    for trial_id, value in (("a", 0.5), ("b", math.inf), ("c", math.nan)):
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, {"val_loss": value, "training_iteration": 1})
    states = [t.state.name for t in searcher._ot_study.trials]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"]
    assert searcher._ot_study.trials[1].value == math.inf
    assert trial_status(1, 3, diverged=True) == "FAILED"


def test_the_sweeps_searcher_learns_the_worst_value_from_a_diverged_trial() -> None:
    """A diverged quant trial reports val_acc_q = NaN (its weights are): the sweep's
    searcher turns it into -inf for a maximized objective, +inf for a minimized one."""
    import optuna

    from sweeps.search import DivergenceAwareOptunaSearch

    def space(trial):
        trial.suggest_float("optim.lr", 0.1, 1.0)

    searcher = DivergenceAwareOptunaSearch(
        space=space, metric=["val_acc_q", "packed_bytes"], mode=["max", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0))
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"val_acc_q": math.nan, "packed_bytes": math.nan,
                                     "diverged": 1.0, "training_iteration": 1})
    searcher.suggest("b")  # not diverged: a NaN stays what it is (Optuna refuses it)
    searcher.on_trial_complete("b", {"val_acc_q": 0.5, "packed_bytes": 100.0,
                                     "training_iteration": 1})
    first, second = searcher._ot_study.trials
    assert first.state.name == "COMPLETE" and first.values == [-math.inf, math.inf]
    assert second.values == [0.5, 100.0]
