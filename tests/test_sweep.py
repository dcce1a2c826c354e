"""A real local Ray runtime and a real SQLite MLflow store: the sweep path end to end,
failures, and data-parallel (2-worker TorchTrainer) trials."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import tiny_config
from mlflow.tracking import MlflowClient

from sweeps.runner import run_sweep
from sweeps.spec import Sweep
from trainables.config import TrialConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    import ray

    # Workers import functions defined here (by module name, as pytest imported it).
    tests_dir = str(Path(__file__).resolve().parent)
    ray.init(num_cpus=2, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})
    yield
    ray.shutdown()


def tiny(root: Path, *overrides: str) -> TrialConfig:
    return tiny_config(root, "train.epochs=2", *overrides)


def lr_space(trial) -> None:
    trial.suggest_float("optim.lr", 0.01, 0.2, log=True)


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


def test_sweep_records_a_parent_run_with_nested_trial_runs(tiny_root: Path,
                                                           tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Selecting on a validation split: the metric need not be one of the usual columns.
    base = tiny(tiny_root, "data.val_fraction=0.25")
    outcome = run_sweep(Sweep(name="t-sweep", base=base, space=lr_space, metric="val_acc",
                              num_samples=3, max_concurrent=2, tracking_uri=uri,
                              storage_path=str(tmp_path / "ray")))
    client = MlflowClient(uri)
    runs = runs_of(uri, "t-sweep")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.run_id == outcome.parent_run_id and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "trials.table.csv", "trials.md", "sweep.png"}
    assert {"best_test_acc", "best_val_acc"} <= set(parent.data.metrics)
    assert parent.data.tags["best_mlflow_run_id"] in {c.info.run_id for c in children}
    tracked = base.tracked_params()
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status in ("FINISHED", "KILLED")
        params = child.data.params
        # The fields the trial reads: sgd's momentum at its default, no Adam or LNS fields.
        assert set(tracked) == set(params) and params["optim.momentum"] == "0.9"
        assert not {"optim.beta1", "optim.lns_bits", "optim.bias_lr"} & set(params)
        assert params["model.channels"] == "[4, 8]"
        for tag in ("git_sha", "hostname", "torch", "ray", "mlflow", "seed", "device"):
            assert child.data.tags[tag], tag
        history = client.get_metric_history(child.info.run_id, "test_acc")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, len(steps) + 1))
        if child.info.status == "FINISHED":
            assert steps == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "curves.png", "checkpoint"} <= artifacts
        ckpt = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")}
        assert ckpt == {"checkpoint/state.pt"}
    assert any(c.info.status == "FINISHED" for c in children)
    assert outcome.best["val_acc"] == max(r["val_acc"] for r in outcome.rows)
    assert {r["optim.lr"] for r in outcome.rows} == {
        float(c.data.params["optim.lr"]) for c in children}


def test_failing_trials_end_failed_and_so_does_the_sweep(tiny_root: Path,
                                                         tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    broken = tiny(tiny_root, "data.name=image_folder", "data.folder=does-not-exist")
    with pytest.raises(RuntimeError, match="no trial reported"):
        run_sweep(Sweep(name="t-fail", base=broken, space=lr_space, num_samples=1,
                        tracking_uri=uri, storage_path=str(tmp_path / "ray"),
                        prepare_data=False))  # so that the failure happens in the trial
    statuses = sorted((("mlflow.parentRunId" in r.data.tags), r.info.status)
                      for r in runs_of(uri, "t-fail"))
    assert statuses == [(False, "FAILED"), (True, "FAILED")]


def test_a_diverged_trial_is_stopped_marked_and_the_sweep_goes_on(tiny_root: Path,
                                                                   tmp_path: Path) -> None:
    """EG at lr 1e4 blows up before its last epoch of three: it stops there, ends FAILED with
    tag diverged and a description that says so; the other trial trains to its end."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = tiny(tiny_root, "train.epochs=3", "train.nonfinite_streak=2")
    points = ({"optim.name": "eg", "optim.lr": 1e4, "optim.weight_decay": 0.0},
              {"optim.name": "sgd", "optim.lr": 0.05})
    outcome = run_sweep(Sweep(name="t-diverge", base=base, points=points, tracking_uri=uri,
                              storage_path=str(tmp_path / "ray"), max_concurrent=1))
    by_name = {r.data.tags["optimizer"]: r for r in runs_of(uri, "t-diverge")
               if "optimizer" in r.data.tags}
    eg, sgd = by_name["eg"], by_name["sgd"]
    assert eg.info.status == "FAILED" and eg.data.tags["diverged"] == "true"
    assert eg.data.tags["mlflow.note.content"].startswith(
        "Diverged: the training loss became non-finite in epoch ")
    assert eg.data.metrics["diverged"] == 1.0 and eg.data.metrics["epoch"] < 3
    assert sgd.info.status == "FINISHED" and sgd.data.tags["diverged"] == "false"
    rows = {r["mlflow_run_id"]: r for r in outcome.rows}
    assert rows[eg.info.run_id]["status"] == "FAILED" and rows[eg.info.run_id]["diverged"]
    assert outcome.best["mlflow_run_id"] == sgd.info.run_id
    # --max-concurrent 1 holds for points too (Tune ignored it there: both ran at once).
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history
    assert max(m.timestamp for m in history(eg.info.run_id, "epoch")) < \
        min(m.timestamp for m in history(sgd.info.run_id, "epoch"))
    # Bounded disk: of sgd's 3 epoch checkpoints Tune keeps the best and the latest.
    sgd_folder = next(p for p in (tmp_path / "ray").glob("t-diverge-*/trial_*")
                      if (p / "checkpoint_000002").exists())
    kept = sorted(c.name for c in sgd_folder.glob("checkpoint_*"))
    assert 1 <= len(kept) <= 2 and kept[-1] == "checkpoint_000002"


def test_missing_data_fails_before_any_ray_work(tiny_root: Path, tmp_path: Path) -> None:
    from trainables.data import DataNotFoundError

    broken = tiny(tiny_root, "data.name=image_folder", "data.folder=does-not-exist")
    with pytest.raises(DataNotFoundError, match="does-not-exist"):
        run_sweep(Sweep(name="t-nodata", base=broken, space=lr_space, num_samples=1,
                        tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                        storage_path=str(tmp_path / "ray")))
    assert not (tmp_path / "ray").exists()


def fixed_lr(trial) -> None:
    trial.suggest_categorical("optim.lr", [0.05])


@pytest.mark.parametrize("stage, metric, artifact", [
    (["evaluate.weight_rounding=[lns4]"], "test_acc_lns4", "weight_rounding.json"),
    (["quant.mode=qat", "quant.bits=4", "quant.per_channel=true"], "test_acc_q", "model.qsw"),
    # Masks grown by magnitude on every rank alike: DDP keeps the weights in step.
    (["prune.schedule=polynomial", "prune.final_sparsity=0.7", "prune.end=0.7",
      "prune.frequency=2"], "sparsity", "model.qsw"),
    # Channels: every rank traces the same graph and holds the same slices at 0.
    (["prune.granularity=channel", "prune.schedule=polynomial", "prune.final_sparsity=0.5",
      "prune.end=0.7", "prune.frequency=2"], "test_acc_shrunk", "model.qsw"),
], ids=["fp32+rounding", "qat-int4", "prune", "prune-channel"])
def test_two_worker_ddp_trial_equals_one_worker_with_the_global_batch(
        tiny_root: Path, tmp_path: Path, stage: list[str], metric: str, artifact: str) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # With a stage: its final metric and file must reach the trial's run from the worker.
    ddp = tiny(tiny_root, "train.num_workers=2", "data.batch_size=32", *stage)
    single = tiny(tiny_root, "train.num_workers=1", "data.batch_size=64", *stage)
    results, final = {}, {}
    client = MlflowClient(uri)
    for name, cfg in (("t-ddp", ddp), ("t-single", single)):
        outcome = run_sweep(Sweep(name=name, base=cfg, space=fixed_lr, num_samples=1,
                                  tracking_uri=uri, storage_path=str(tmp_path / "ray")))
        (child,) = [r for r in runs_of(uri, name) if "mlflow.parentRunId" in r.data.tags]
        assert child.info.status == "FINISHED"
        assert child.data.tags["num_workers"] == str(cfg.train.num_workers)
        results[name] = outcome.best
        final[name] = child.data.metrics[metric]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert artifact in artifacts, artifacts
        if artifact.endswith(".json"):
            local = client.download_artifacts(child.info.run_id, artifact, str(tmp_path / name))
            assert json.loads(Path(local).read_text())["lns4"]["test_acc"] == final[name]
    # DDP averages the two shards' gradients: the same steps as one batch of 64. Under
    # 4-bit QAT the last-bit differences of DDP's gradient all-reduce can move a weight
    # across a rounding boundary, and the forward pass jumps a level: measured 1.7e-4
    # relative on this tiny data (fp32: within 1e-4).
    qat = metric == "test_acc_q"
    assert results["t-ddp"]["train_loss"] == pytest.approx(results["t-single"]["train_loss"],
                                                           rel=1e-3 if qat else 1e-4)
    # Accuracy on 80 test images: one flipped prediction is 0.0125; a few more under QAT.
    tolerance = 0.05 if qat else 0.02
    assert results["t-ddp"]["test_acc"] == pytest.approx(results["t-single"]["test_acc"],
                                                         abs=tolerance)
    # The final evaluation covers the whole test set in both (sharded, then summed).
    assert final["t-ddp"] == pytest.approx(final["t-single"], abs=0.05)


class _CrashOnce:
    """A TuneSession that dies after its first report, once (a marker file remembers):
    by raising, or by a SIGKILL of the trial's own process (what the OOM killer or a
    preempted node does: no Python cleanup runs)."""

    def __init__(self, marker: str, how: str) -> None:
        from trainables.sessions import TuneSession

        self.inner, self.marker, self.how = TuneSession(), Path(marker), how
        self.world_rank = self.local_rank = 0
        self.world_size = 1

    def report(self, metrics, checkpoint_dir) -> None:
        self.inner.report(metrics, checkpoint_dir)
        if not self.marker.exists():
            self.marker.write_text(f"crashed in process {os.getpid()}")
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("simulated worker crash")

    def load_state(self):
        return self.inner.load_state()


def _crashing_trial(config: dict) -> None:
    from trainables.loop import run_trial

    cfg = TrialConfig.from_flat({k: v for k, v in config.items()
                                 if k not in ("marker", "how")})
    run_trial(cfg, _CrashOnce(config["marker"], config["how"]))


@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_tune_restarts_a_crashed_trial_from_its_checkpoint(tiny_root: Path, tmp_path: Path,
                                                           how: str) -> None:
    from ray import tune

    from trainables.loop import run_trial
    from trainables.sessions import LocalSession

    cfg = tiny(tiny_root, "train.epochs=3", "train.threads=1",
               f"data.cache_dir={tmp_path / 'cache'}")
    tuner = tune.Tuner(
        _crashing_trial,
        param_space={**cfg.to_flat(), "marker": str(tmp_path / "crashed"), "how": how},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="crash",
                                  failure_config=tune.FailureConfig(max_failures=1)))
    (result,) = list(tuner.fit())
    assert result.error is None and (tmp_path / "crashed").exists()
    assert f"process {os.getpid()}" not in (tmp_path / "crashed").read_text()
    history = result.metrics_dataframe.sort_values("training_iteration")
    uninterrupted = run_trial(cfg, LocalSession())
    assert list(history["epoch"]) == [1, 2, 3]
    assert list(history["test_loss"]) == [m["test_loss"] for m in uninterrupted]
    assert list(history["train_loss"]) == [m["train_loss"] for m in uninterrupted]
