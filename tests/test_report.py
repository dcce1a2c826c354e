"""What a researcher reads in MLflow: descriptive trial names and tags, honest group runs,
early stops said as such, and ``python -m sweeps.report`` from the store alone (a real
SQLite MLflow store written through SweepTracker, no Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sweeps.report import main, report
from sweeps.search import space_ranges
from sweeps.tracking import SweepTracker, quant_label, trial_run_name, trial_tags
from trainables.config import TrialConfig

ROOT = Path(__file__).resolve().parent.parent


def _flat(*overrides: str) -> dict:
    return TrialConfig().with_overrides(list(overrides)).to_flat()


def test_trial_names_lead_with_what_distinguishes_them():
    config = _flat("optim.name=madam", "optim.lr=0.0995", "optim.weight_decay=4.3e-5",
                   "train.seed=2")
    assert trial_run_name(config, ["optim.lr", "optim.weight_decay"]) == \
        "madam lr=0.0995 wd=4.3e-05 s2"
    qat = _flat("quant.mode=qat", "quant.bits=4", "model.name=lenet", "train.seed=1")
    assert trial_run_name(qat, ["quant.bits", "model.name"]) == "sgd int4-qat lenet s1"
    # A study's seed re-runs vary the cell: dataset/model join the name.
    seeds = _flat("optim.name=eg", "data.name=fashion_mnist", "model.name=mlp",
                  "train.seed=3")
    assert trial_run_name(seeds, ["data.name", "model.name", "optim.name", "train.seed"]) \
        == "eg fashion_mnist/mlp s3"
    assert quant_label(_flat("quant.mode=ptq", "quant.format=codebook", "quant.k=16")) == \
        "codebook16-ptq"
    assert quant_label(_flat()) == ""


def test_trial_tags_separate_phases_and_cells():
    tags = trial_tags(_flat("optim.name=adam_eg", "quant.mode=qat", "quant.bits=4"), "final")
    assert tags == {**tags, "phase": "final", "optimizer": "adam_eg", "dataset": "mnist",
                    "model": "lenet", "precision": "fp32", "quant": "int4-qat"}


def test_space_ranges_name_every_searched_key():
    def space(trial):
        trial.suggest_float("optim.lr", 1e-3, 0.5, log=True)
        if trial.suggest_categorical("quant.mode", ["ptq", "qat"]) == "qat":
            trial.suggest_int("quant.bits", 2, 8)

    assert space_ranges(space) == {"search.optim.lr": "0.001..0.5 log",
                                   "search.quant.mode": "one of ptq, qat",
                                   "search.quant.bits": "2..8"}


def _store(tmp_path: Path) -> tuple[str, SweepTracker]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, SweepTracker(uri, "demo")


def _trial(tracker: SweepTracker, config: dict, phase: str, acc: float, status: str,
           **tags: str) -> str:
    run = tracker.start_trial(trial_run_name(config, ["optim.lr"]), {"optim.lr": config[
        "optim.lr"], "optim.name": config["optim.name"]}, {**trial_tags(config, phase), **tags})
    tracker.log_metrics(run, {"test_acc": acc, "epoch": 3}, step=3)
    tracker.end_run(run, status)
    return run


def test_report_of_a_running_study_builds_the_table_from_its_final_trials(tmp_path, capsys):
    uri, tracker = _store(tmp_path)
    study = tracker.start_sweep("demo study", tags={"kind": "study"})
    tracker.start_sweep("search mnist/lenet/eg", tags={"kind": "search",
                                                      "mlflow.parentRunId": study})
    _trial(tracker, _flat("optim.name=eg", "optim.lr=0.5"), "search", 0.9, "KILLED",
           stopped_early="ASHA at epoch 1")
    tracker.start_sweep("seeds", tags={"kind": "points", "mlflow.parentRunId": study})
    for seed, acc in ((1, 0.97), (2, 0.99)):
        _trial(tracker, _flat("optim.name=eg", "optim.lr=0.5", f"train.seed={seed}"),
               "final", acc, "FINISHED")
    text = report("demo", uri, tmp_path / "out")
    assert "| mnist | lenet | eg | 2 | 2 | 0 | 98.00 +- 1.41 |" in text
    assert "stopped early (ASHA at epoch 1)" in (tmp_path / "out" / "trials.csv").read_text()
    assert (tmp_path / "out" / "report.md").read_text() == text

    # The same through the command line; then bad targets: one line, exit 2.
    assert main([study, "--tracking-uri", uri]) == 0
    assert "98.00 +- 1.41" in capsys.readouterr().out
    assert main(["nope", "--tracking-uri", uri]) == 2
    assert "'nope' is invalid: allowed a run id or one of the experiments" in \
        capsys.readouterr().err
    assert main(["demo", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2


def test_the_report_says_which_library_versions_differ_from_the_installed_ones(tmp_path):
    from sweeps.provenance import version_drift, versions

    uri, tracker = _store(tmp_path)
    here = versions()
    same = tracker.start_sweep("same", tags={"kind": "search"})  # tags the versions here
    assert "differ" not in report(same, uri)
    older = tracker.start_sweep("older", tags={"kind": "search", "optuna": "0.0.1",
                                               "ray": here["ray"]})
    text = report(older, uri)
    assert (f"Library versions differ from the installed ones: optuna 0.0.1 (run) vs "
            f"{here['optuna']} (installed).") in text
    assert version_drift({"python": here["python"], "numpy": "0.1", "left_alone": "x"}) == \
        [("numpy", "0.1", here["numpy"])]
    assert version_drift({"optuna": here["optuna"]}) == []


def test_experiment_opens_on_the_runs_table_with_a_description(tmp_path):
    uri, tracker = _store(tmp_path)
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "demo" in tags["mlflow.note.content"]


def test_report_runs_as_a_module(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sweeps.report", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "experiment name" in out.stdout


@pytest.mark.parametrize("target", ["0" * 32])
def test_an_unknown_run_id_is_one_line(tmp_path, capsys, target):
    uri, _ = _store(tmp_path)
    assert main([target, "--tracking-uri", uri]) == 2
    assert "is not in this tracking store" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_light_ui_serves_the_store_and_leaves_nothing_running(tmp_path):
    """python -m sweeps.ui: one worker on 127.0.0.1 answers the runs API with the store's
    experiment; stopping it stops every process it started."""
    uri, tracker = _store(tmp_path)
    tracker.start_sweep("demo study", tags={"kind": "study"})
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.ui", "--tracking-uri", uri,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, body = time.time() + 90, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/"
                                            "experiments/search?max_results=10",
                                            timeout=2) as response:
                    body = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the light UI did not answer in 90 s"
        assert "demo" in [e["name"] for e in body["experiments"]]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    leftover = subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True,
                              text=True).stdout.split()
    assert not leftover


def test_a_trial_reruns_from_its_run_id(tmp_path, tiny_root, capsys):
    from conftest import tiny_config

    from sweeps.rerun import main as rerun

    uri, tracker = _store(tmp_path)
    tracker.start_sweep("demo", tags={"kind": "search"})
    cfg = tiny_config(tiny_root, "train.epochs=1")
    run_id = tracker.start_trial("sgd s0", {}, {"git_sha": "0123abc"})
    tracker.log_text(run_id, cfg.to_yaml(), "config.yaml")
    tracker.log_metrics(run_id, {"test_acc": 0.5}, step=1)
    tracker.end_run(run_id, "FINISHED")
    assert rerun([run_id, "--tracking-uri", uri]) == 0
    captured = capsys.readouterr()
    assert "was made with code 0123abc" in captured.err
    assert "test_acc: now " in captured.out and "logged 0.5000" in captured.out
    # A config logged by older code, with a key this code no longer has: dropped, said.
    old = tracker.start_trial("sgd s0 old", {}, {"git_sha": "0123abc"})
    tracker.log_text(old, cfg.to_yaml() + "\ntrain.retired_knob: 3\n", "config.yaml")
    tracker.end_run(old, "FINISHED")
    assert rerun([old, "--tracking-uri", uri, "--set", "train.epochs=1"]) == 0
    assert "set train.retired_knob=3, which this code no longer has" in \
        capsys.readouterr().err
    study = tracker.start_sweep("group", tags={"kind": "study"})
    assert rerun([study, "--tracking-uri", uri]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


def test_search_runs_log_the_ranges_and_constants_as_trials_ran_them():
    from sweeps.search import fixed_config
    from sweeps.spec import Sweep

    def space(trial):
        if trial.suggest_categorical("optim.name", ["sgd", "eg"]) == "eg":
            trial.suggest_float("optim.lr", 0.1, 10.0, log=True)
        else:
            trial.suggest_float("optim.lr", 1e-3, 1.0, log=True)
        return {"optim.weight_decay": 0.0}

    ranges = space_ranges(space)
    assert set(ranges["search.optim.lr"].split(" | ")) == {"0.1..10 log", "0.001..1 log"}
    assert ranges["search.optim.weight_decay"] == "= 0.0"
    base = TrialConfig()
    points = ({"optim.name": "eg", "optim.bias_lr": 0.01, "optim.lr": 1.0},
              {"optim.name": "eg", "optim.bias_lr": 0.01, "optim.lr": 2.0})
    fixed = fixed_config(Sweep(name="s", base=base, points=points), base)
    assert fixed.tracked_params()["optim.bias_lr"] == 0.01  # not the base's
    assert fixed_config(Sweep(name="s", base=base, space=space), base).optim.weight_decay == 0.0


def test_a_long_trial_name_is_cut_to_what_mlflow_stores():
    config = {f"model.k{i}": 0.123456 for i in range(60)} | {"optim.name": "eg",
                                                            "train.seed": 7}
    name = trial_run_name(config, list(config))
    assert len(name) == 250 and name.startswith("eg k0=0.123 ") and name.endswith("~ s7")


def test_a_moved_store_finds_its_artifacts_again(tmp_path, capsys):
    import shutil

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import adopt_moved_store, existing_store

    uri, tracker = _store(tmp_path / "lab")
    parent = tracker.start_sweep("demo", tags={"kind": "search"})
    tracker.log_text(parent, "| a |\n|---|\n| 1 |\n", "trials.md")
    tracker.end_run(parent, "FINISHED")
    shutil.move(tmp_path / "lab", tmp_path / "laptop")  # the folder, as a researcher moves it
    moved = f"sqlite:///{tmp_path / 'laptop' / 'mlflow.db'}"
    client = MlflowClient(moved)
    with pytest.raises(MlflowException):  # MLflow still looks in the old folder
        client.download_artifacts(parent, "trials.md", str(tmp_path))
    assert existing_store(moved) == moved
    assert "this MLflow store was moved from" in capsys.readouterr().err
    local = client.download_artifacts(parent, "trials.md", str(tmp_path))
    assert Path(local).read_text().startswith("| a |")
    assert client.get_run(parent).info.artifact_uri.startswith(
        (tmp_path / "laptop" / "mlartifacts").as_uri())
    assert adopt_moved_store(moved) == 0  # in place now: nothing to do
    # A server or a store without artifacts beside it is left alone, and so is one that
    # merely sits under a folder named mlartifacts (it was rewritten, level by level).
    assert adopt_moved_store("http://127.0.0.1:5000") == 0
    nested_uri, nested = _store(tmp_path / "mlartifacts" / "proj")
    run = nested.start_sweep("x")
    nested.log_text(run, "hi", "a.md")
    before = nested.client.get_run(run).info.artifact_uri
    assert [adopt_moved_store(nested_uri) for _ in range(2)] == [0, 0]
    assert nested.client.get_run(run).info.artifact_uri == before
