"""sweeps/prune_quant.py as a researcher runs it: help, bad schedules before Ray, the
space's constraints, and a smoke multi-objective sweep whose run holds the front."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from test_cli import run

from sweeps.prune_quant import ScheduleSpace, describe
from sweeps.search import validate_space
from trainables.config import TrialConfig

SCRIPT = Path(__file__).resolve().parent.parent / "sweeps" / "prune_quant.py"


def test_help(tmp_path: Path) -> None:
    out = run(["--help"], tmp_path, script=SCRIPT)
    assert out.returncode == 0
    for flag in ("--schedule-only", "--preset", "--smoke-test", "--num-samples"):
        assert flag in out.stdout


@pytest.mark.parametrize("args, says", [
    (["--set", "prune.final_sparsity=1.5"], "prune.final_sparsity=1.5 is invalid"),
    (["--set", "prune.frequency=0"], "prune.frequency=0 is invalid"),
    (["--preset", "seed005"], "invalid choice"),
    (["--set", "prune.granularity=channel", "--set", "prune.final_sparsity=0.95",
      "--set", "model.name=lenet", "--set", "model.channels=[6,16]"],
     "removes all 6 output channels of features.0"),
    (["--preset", "seed004", "--cost", "latency"], "--cost=latency is invalid with --preset"),
])
def test_bad_input_stops_before_ray(tmp_path: Path, tiny_root: Path, args: list[str],
                                    says: str) -> None:
    out = run(args, tmp_path, tiny_root, timeout=120, script=SCRIPT)
    assert out.returncode == 2 and says in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "ray_results").exists()


def test_every_proposed_schedule_is_valid_and_ends_after_it_starts() -> None:
    base = TrialConfig().with_overrides(["prune.schedule=polynomial", "quant.mode=ptq"])
    searched = validate_space(base, ScheduleSpace(), samples=40)
    assert {"prune.schedule", "prune.final_sparsity", "prune.end", "quant.bits",
            "prune.granularity", "prune.scope"} <= set(searched)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(40):
        trial = study.ask()
        built = ScheduleSpace()(trial)
        params = {k: v for k, v in trial.params.items() if not k.startswith("space.")}
        cfg = base.replace({**params, **built})
        assert cfg.prune.schedule != "polynomial" or cfg.prune.end > cfg.prune.start
        if cfg.prune.granularity == "channel":  # LeNet-5's 6 channels keep one
            assert cfg.prune.scope == "layer" and cfg.prune.final_sparsity <= 0.75
        assert describe(cfg.to_flat()).startswith(cfg.prune.schedule)
        study.tell(trial, 0.0)
    only = validate_space(base, ScheduleSpace(search_format=False))
    assert "quant.bits" not in only and "prune.final_sparsity" in only


@pytest.mark.ray
def test_smoke_sweep_records_the_front(tmp_path: Path, tiny_root: Path) -> None:
    """With bit operations as the third objective: channel pruning lowers them."""
    out = run(["--smoke-test", "--num-samples", "4", "--address", "local", "--cost", "bitops",
               "--set", "model.channels=[4,8]", "--set", "model.hidden=[32]"],
              tmp_path, tiny_root, timeout=600, script=SCRIPT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "=== Pareto front" in out.stdout and "| bitops |" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("prune_quant").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    assert all(t.data.tags["prune"] != "none" and "sparsity" in t.data.metrics
               for t in trials)
    assert {"pareto.md", "pareto.table.csv", "pareto.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


def test_channel_sparsity_is_searched_only_as_far_as_every_layer_keeps_a_channel(
        tiny_root: Path) -> None:
    """round(s x 2) < 2 up to 0.74 for a 2-channel layer; a space whose limit is below
    the searched minimum proposes element pruning only."""
    from sweeps.prune_quant import DEFAULTS, channel_limit

    base = TrialConfig().with_overrides([*DEFAULTS, f"data.root={tiny_root}",
                                         "model.channels=[2,4]"])
    assert channel_limit(base) == 0.74
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(20):
        trial = study.ask()
        built = ScheduleSpace(channel_max=0.2)(trial)
        assert trial.params["prune.granularity"] == "element"
        assert "space.channel_sparsity" not in trial.params and "prune.scope" not in built
