"""``qsweep`` and ``python -m sweeps.train`` as a user runs them: the commands and their
help, bad input before Ray, and one tracked QAT trial with its printed metrics and run id."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_cli import run

from sweeps.qsweep import COMMANDS, SWEEPS

ROOT = Path(__file__).resolve().parent.parent
QSWEEP = ROOT / "sweeps" / "qsweep.py"


def test_the_qsweep_command_is_installed() -> None:
    assert (Path(sys.executable).parent / "qsweep").exists()


def test_every_sweep_script_is_a_qsweep_sweep() -> None:
    scripts = {p.stem for p in (ROOT / "sweeps").glob("*.py")
               if "main_guard(main)" in p.read_text() and p.stem != "train"}
    assert scripts == set(SWEEPS)


@pytest.mark.slow
def test_help_of_qsweep_and_of_each_command(tmp_path: Path) -> None:
    out = run(["--help"], tmp_path, script=QSWEEP)
    assert out.returncode == 0
    for name in (*COMMANDS, *SWEEPS):
        assert name in out.stdout
    for command in ("train", "report", "rerun", "ui", "cluster-check"):
        out = run([command, "--help"], tmp_path, script=QSWEEP, timeout=120)
        assert out.returncode == 0 and "usage:" in out.stdout, (command, out.stderr[-1000:])
    out = run(["train", "--help"], tmp_path, script=QSWEEP)
    for flag in ("--set", "--config", "--num-workers", "--address", "--experiment"):
        assert flag in out.stdout
    out = run(["sweep", "quant_bits", "--help"], tmp_path, script=QSWEEP, timeout=120)
    assert out.returncode == 0 and "--formats" in out.stdout
    for bad, says in ((["nope"], "qsweep 'nope' is invalid: allowed one of train"),
                      (["sweep", "nope"], "sweep 'nope' is invalid: allowed one of eg_vs_gd")):
        out = run(bad, tmp_path, script=QSWEEP)
        assert out.returncode == 2 and says in out.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--set", "quant.bits=99"], "quant.bits"),
    (["--set", "quant.gradient_bits=8"],
     "quant.gradient_bits=8 is invalid: allowed 0 with quant.mode=none"),
    (["--epochs", "0"], "train.epochs"),
    (["--set", "model.name=mlp", "--set", "model.widths=[16]", "--set",
      "prune.schedule=constant", "--set", "prune.exclude_first_last=true"],
     "prune.schedule=constant is invalid for this model: it leaves no Linear/Conv layer"),
    (["--epochs", "3", "--set", "model.name=mlp", "--set", "lc.conv=prune:0.1",
      "--set", "lc.steps=1"], "lc.conv='prune:0.1' names no layer: mlp has no Conv2d"),
    (["--epochs", "3", "--set", "model.name=mlp", "--set", "model.widths=[8]",
      "--set", "lc.linear=lowrank:rank=9", "--set", "lc.steps=1"],
     "lowrank:rank=9 is invalid for net.1 (8x784): allowed 1..8"),
])
def test_bad_input_stops_before_ray(tmp_path: Path, tiny_root: Path, args: list[str],
                                    fragment: str) -> None:
    out = run(["train", *args], tmp_path, tiny_root, timeout=120, script=QSWEEP)
    assert out.returncode == 2 and fragment in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.ray
def test_one_qat_trial_prints_its_metrics_and_run_id(tmp_path: Path, tiny_root: Path) -> None:
    out = run(["train", "--address", "local", "--experiment", "qat", "--epochs", "2",
               "--set", "model.channels=[4,8]", "--set", "model.hidden=[32]",
               "--set", "quant.mode=qat", "--set", "quant.bits=4"],
              tmp_path, tiny_root, timeout=300, script=QSWEEP)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "=== trial finished ===" in out.stdout
    printed = dict(re.findall(r"^\s+(\w+) = (\S+)$", out.stdout, re.M))
    run_id = re.search(r"trial run ([0-9a-f]{32})", out.stdout).group(1)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trial = client.get_run(run_id)
    assert trial.info.status == "FINISHED"
    assert client.get_experiment(trial.info.experiment_id).name == "qat"
    assert trial.data.tags["quant"] == "int4-qat" and "mlflow.parentRunId" in trial.data.tags
    for key in ("test_acc", "test_acc_q", "packed_bytes", "compression_ratio"):
        assert float(printed[key]) == pytest.approx(trial.data.metrics[key], rel=1e-5)
    assert int(trial.data.metrics["epoch"]) == 2
    assert "model.qsw" in {a.path for a in client.list_artifacts(run_id, "")} | {
        a.path.rpartition("/")[2] for a in client.list_artifacts(run_id, "artifacts")}
