"""A sweep's driver killed as it happens on a shared machine, then resumed with the same
command: a real ``sweeps/baseline.py`` in a subprocess, a real embedded Ray, a real SQLite
MLflow store. SIGKILL (the driver dies, nothing runs its handlers) and SIGINT (Ctrl-C) each
after >= 2 trials ended; the resumed sweep must not re-run a finished trial, must reuse the
MLflow runs (one run per trial, none left RUNNING) and the Optuna searcher must keep its
history (ray issue 30861 reported it lost on restore)."""

from __future__ import annotations

import glob
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sweeps" / "baseline.py"
SAMPLES = 5
# 30 epochs: with trial processes reused, 3-epoch trials on the tiny data end within
# the second the tests wait before killing the driver.
ARGS = ["--num-samples", str(SAMPLES), "--epochs", "30", "--max-concurrent", "1",
        "--address", "local", "--set", "data.batch_size=32", "--set", "model.channels=[4,8]",
        "--set", "model.hidden=[32]"]

pytestmark = pytest.mark.ray


def _env(cwd: Path, data: Path) -> dict[str, str]:
    env = dict(os.environ, QSWEEP_CACHE=str(cwd / "cache"), QSWEEP_DATA=str(data))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _start(cwd: Path, data: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = cwd / f"driver-{time.time_ns()}.log"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *ARGS, *extra], cwd=cwd,
                            env=_env(cwd, data), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait_for_ended_trials(proc: subprocess.Popen, log: Path, n: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        text = log.read_text()
        if text.count(" finished\n") + text.count(" stopped early by the scheduler\n") >= n:
            return
        assert proc.poll() is None, text[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{n} trials did not end in 240 s:\n{log.read_text()[-3000:]}")


def _kill_group(proc: subprocess.Popen) -> None:
    """What is left of the driver's session (the embedded Ray it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _runs(cwd: Path) -> tuple[object, list]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("baseline")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _searcher_trials(cwd: Path) -> list[str]:
    """The Optuna trial states in the sweep's newest saved searcher state."""
    import __main__
    from sweeps.baseline import space
    __main__.space = space  # the script's space, pickled by reference to __main__
    newest = sorted(glob.glob(str(cwd / "ray_results" / "baseline-*" / "searcher-state-*")))
    with open(newest[-1], "rb") as f:
        state = pickle.load(f)
    return [t.state.name for t in state["_ot_study"].trials]


def _resume_and_check(cwd: Path, data: Path, ended_before: dict[str, float],
                      *resume: str) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), *ARGS, *resume], cwd=cwd,
                         env=_env(cwd, data), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "resuming sweep run" in out.stdout
    parent, trials = _runs(cwd)
    assert parent.info.status == "FINISHED", out.stdout[-3000:]
    assert len(trials) == SAMPLES, out.stdout[-3000:]  # one run per trial
    assert len({t.data.tags["trial_id"] for t in trials}) == SAMPLES
    assert {t.info.status for t in trials} <= {"FINISHED", "KILLED"}  # none RUNNING
    for trial in trials:  # a trial that had ended was not run again
        if trial.data.tags["trial_id"] in ended_before:
            assert trial.info.end_time == ended_before[trial.data.tags["trial_id"]]
    # Every trial reached the searcher: the ones before the kill and after it.
    assert _searcher_trials(cwd) == ["COMPLETE"] * SAMPLES
    # Trials run in this session (a trial Tune retries prints "started:" once more).
    started = set(re.findall(r"trial_(\w+) started:", out.stdout))
    assert len(started) == SAMPLES - len(ended_before), out.stdout[-3000:]
    assert not started & set(ended_before), out.stdout[-3000:]
    for trial_id in ended_before:  # no epoch trained again
        assert f"trial_{trial_id} epoch" not in out.stdout


def test_a_sigkilled_sweep_resumes_where_it_stopped(tmp_path: Path, tiny_root: Path) -> None:
    proc, log = _start(tmp_path, tiny_root)
    try:
        _wait_for_ended_trials(proc, log, 2)
        time.sleep(1.5)  # Tune saves its state every second (sweeps.runner.init_ray)
        proc.send_signal(signal.SIGKILL)  # the driver only, as an OOM killer would
        proc.wait(timeout=30)
    finally:
        time.sleep(2)
        _kill_group(proc)
    parent, trials = _runs(tmp_path)
    assert parent.info.status == "RUNNING"  # nobody could end it
    ended = {t.data.tags["trial_id"]: t.info.end_time for t in trials
             if t.info.status != "RUNNING"}
    assert len(ended) >= 2
    _resume_and_check(tmp_path, tiny_root, ended, "--resume")


def test_ctrl_c_ends_the_runs_killed_and_says_how_to_resume(tmp_path: Path,
                                                            tiny_root: Path) -> None:
    proc, log = _start(tmp_path, tiny_root)
    try:
        _wait_for_ended_trials(proc, log, 2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        _kill_group(proc)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    parent, trials = _runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {t.info.status for t in trials}
    command = text.split("Resume with:\n")[1].strip().splitlines()[0]
    assert command.endswith(f"--resume {parent.info.run_id}")
    ended = {t.data.tags["trial_id"]: t.info.end_time for t in trials
             if t.data.tags.get("interrupted") != "true"}
    _resume_and_check(tmp_path, tiny_root, ended, "--resume", parent.info.run_id)
    _, trials = _runs(tmp_path)
    for trial in trials:  # an interrupted trial went on in the same run, and says so
        if trial.data.tags.get("interrupted"):
            assert trial.data.tags["interrupted"] == "resumed"
            assert trial.info.status in ("FINISHED", "KILLED")


STUDY = ROOT / "sweeps" / "eg_vs_gd.py"


def test_an_interrupted_study_resumes_at_its_cell(tmp_path: Path, tiny_root: Path) -> None:
    """Ctrl-C once the first cell's search finished (the cells search side by side, the
    second one is then mid-way or, on a fast machine, done too): the resumed study reads
    the finished cells back (their trials are not run again), runs an unfinished one
    again from its start (its halving decisions were not saved), then the seeds."""
    args = [sys.executable, str(STUDY), "--smoke-test", "--optimizers", "gd", "eg",
            "--address", "local"]
    log = tmp_path / "study.log"
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(tmp_path, tiny_root),
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while "=== search mnist/mlp/gd finished" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        _kill_group(proc)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eg_vs_gd").experiment_id
    (study,) = client.search_runs([exp], "tags.kind = 'study'")
    assert study.info.status == "KILLED"
    gd_trials = {r.info.run_id: r.info.end_time for r in client.search_runs([exp])
                 if r.data.tags.get("optimizer") == "gd"}
    assert len(gd_trials) == 2  # the first cell's search finished

    out = subprocess.run([*args, "--resume"], cwd=tmp_path, env=_env(tmp_path, tiny_root),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"resuming study run {study.info.run_id}" in out.stdout
    assert "finished before the interrupt: read back" in out.stdout
    runs = client.search_runs([exp])
    assert client.get_run(study.info.run_id).info.status == "FINISHED"
    assert "RUNNING" not in {r.info.status for r in runs}
    # An interrupted cell halves: its search ran again from its start, and the run it
    # left ended KILLED, saying why.
    killed = {r.info.run_id for r in runs
              if r.data.tags.get("kind") == "search" and r.info.status == "KILLED"}
    for run_id in killed:
        assert "successive-halving decisions" in \
            client.get_run(run_id).data.tags["mlflow.note.content"]
    trials = [r for r in runs if "trial_id" in r.data.tags
              and r.data.tags.get("mlflow.parentRunId") not in killed]
    assert len(trials) == 2 * 2 + 2 * 2  # 2 cells x 2 searched, 2 cells x 2 seeds
    for run_id, end_time in gd_trials.items():  # gd's search was not run again
        assert client.get_run(run_id).info.end_time == end_time
    assert "| mnist | mlp | eg - gd | 2 |" in out.stdout
