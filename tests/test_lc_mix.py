"""sweeps/lc_mix.py as a researcher runs it: help, bad input before Ray, the space's
proposals, and a smoke multi-objective sweep whose run holds the front and the table."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from test_cli import run

from sweeps.lc_mix import DEFAULTS, SEED003, MixSpace, describe, has_conv
from sweeps.search import validate_space
from trainables.config import TrialConfig
from trainables.models import model_for_trial
from trainables.stages.lc import lc_tasks

SCRIPT = Path(__file__).resolve().parent.parent / "sweeps" / "lc_mix.py"


def test_help(tmp_path: Path) -> None:
    out = run(["--help"], tmp_path, script=SCRIPT)
    assert out.returncode == 0
    for flag in ("--preset", "--smoke-test", "--num-samples", "--epochs"):
        assert flag in out.stdout


@pytest.mark.parametrize("args, says", [
    (["--set", "lc.mu0=0"], "lc.mu0=0.0 is invalid: allowed a value > 0.0"),
    (["--set", "lc.growth=0.5"], "lc.growth=0.5 is invalid"),
    (["--set", "lc.linear=codebook:1"], "codebook:k=1 is invalid"),
    (["--epochs", "3"], "lc.steps=12 is invalid: allowed at most 3"),
    (["--set", "lc.layers=fc9=prune:0.1"], "layer 'fc9' is not in the model"),
    (["--preset", "seed002"], "invalid choice"),
])
def test_bad_input_stops_before_ray(tmp_path: Path, tiny_root: Path, args: list[str],
                                    says: str) -> None:
    out = run(args, tmp_path, tiny_root, timeout=120, script=SCRIPT)
    assert out.returncode == 2 and says in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "ray_results").exists()


def test_every_proposal_is_a_valid_compression_of_lenet5_and_the_mlp(tiny_root: Path) -> None:
    base = TrialConfig().with_overrides([*DEFAULTS, f"data.root={tiny_root}"])
    searched = validate_space(base, MixSpace(), samples=30)
    assert {"lc.conv", "lc.linear"} <= set(searched)
    model = model_for_trial(base, (1, 28, 10))
    kinds = set()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(60):
        trial = study.ask()
        cfg = base.replace(MixSpace()(trial))
        tasks = lc_tasks(cfg, model)  # fits the model: no trial fails inside Ray
        assert cfg.lc.linear != "none" and tasks
        kinds |= {c.kind for c in tasks.values()}
        assert describe(cfg.to_flat()).startswith(f"conv {cfg.lc.conv}, linear ")
        study.tell(trial, 0.0)
    assert kinds == {"codebook", "prune", "lowrank", "int"}
    mlp = base.with_overrides(["model.name=mlp"])
    assert not has_conv(mlp) and has_conv(base)
    assert MixSpace(conv=False)(optuna.create_study().ask())["lc.conv"] == "none"


def test_the_seed003_preset_points_are_valid_configs() -> None:
    base = TrialConfig().with_overrides(DEFAULTS)
    model = model_for_trial(base, (1, 28, 10))
    for point in SEED003.values():
        lc_tasks(base.replace(point), model)


@pytest.mark.ray
def test_smoke_sweep_records_the_front_and_every_trial(tmp_path: Path,
                                                       tiny_root: Path) -> None:
    out = run(["--smoke-test", "--num-samples", "3", "--address", "local",
               "--set", "model.channels=[4,8]", "--set", "model.hidden=[32]"],
              tmp_path, tiny_root, timeout=600, script=SCRIPT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "=== Pareto front" in out.stdout and "=== every trial" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lc_mix").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials)
    for t in trials:
        assert t.data.tags["lc"].startswith("lc-")
        assert {"test_acc_lc", "val_acc_lc", "packed_bytes", "lc_distance"} <= \
            set(t.data.metrics)
        assert {"model.qsw", "lc.json"} <= {a.path for a in
                                            client.list_artifacts(t.info.run_id)}
    assert {"pareto.md", "pareto.table.csv", "pareto.png", "compressions.md"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


def test_epochs_and_set_are_validated_together(tiny_root: Path) -> None:
    """--epochs 4 below the default 6 L steps is fine when --set lowers lc.steps too."""
    from sweeps.cli import base_config
    from sweeps.lc_mix import SMOKE, parse_args

    args = parse_args(["--epochs", "4", "--set", "lc.steps=2", "--data-root", str(tiny_root)])
    cfg = base_config(args, DEFAULTS, SMOKE)
    assert (cfg.train.epochs, cfg.lc.steps) == (4, 2)
