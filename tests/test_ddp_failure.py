"""A 2-worker DDP trial (Ray Train V2 inside a Tune trial) whose rank-1 worker process is
SIGKILLed after its first epoch: Tune restarts the trial (max_failures=1), the new
TorchTrainer resumes from the run's last checkpoint, and the trial ends with the same
losses as an uninterrupted run. The kill is injected by ``QSWEEP_FAULT_KILL_WORKER``
(trainables/sessions.py), given to the workers through the job's runtime env."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_config
from mlflow.tracking import MlflowClient

from sweeps.runner import run_sweep
from sweeps.spec import Sweep

pytestmark = pytest.mark.ray


@pytest.fixture()
def marker(tmp_path: Path):
    import ray

    from trainables.sessions import FAULT_ENV

    path = tmp_path / "killed"
    ray.init(num_cpus=2, logging_level="WARNING",
             runtime_env={"env_vars": {FAULT_ENV: f"1:1:{path}"}})
    yield path
    ray.shutdown()


def test_a_killed_ddp_worker_resumes_to_the_same_result(marker: Path, tmp_path: Path,
                                                        tiny_root: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = tiny_config(tiny_root, "train.epochs=3", "train.num_workers=2",
                       "train.cpus_per_worker=1", "train.threads=1",
                       f"data.cache_dir={tmp_path / 'cache'}")
    results = {}
    for name, kill in (("t-whole", False), ("t-killed", True)):
        if kill:
            marker.unlink()
        else:
            marker.write_text("no kill in this run")
        outcome = run_sweep(Sweep(name=name, base=base, points=({"optim.lr": 0.05},),
                                  metric="test_acc", tracking_uri=uri, max_failures=1,
                                  storage_path=str(tmp_path / "ray")))
        results[name] = outcome
    assert marker.read_text() == "killed rank 1 after epoch 1"  # the kill happened
    client = MlflowClient(uri)
    finals = {}
    for name, outcome in results.items():
        (result,) = list(outcome.results)
        assert result.error is None, result.error
        history = result.metrics_dataframe.sort_values("training_iteration")
        finals[name] = dict(zip(history["epoch"], history["train_loss"], strict=True))
        run = client.get_run(outcome.rows[0]["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["epoch"] == 3
    assert sorted(finals["t-killed"]) == [1, 2, 3]
    for epoch in (1, 2, 3):
        assert finals["t-killed"][epoch] == pytest.approx(finals["t-whole"][epoch], abs=1e-6)
