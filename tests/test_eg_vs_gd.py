"""sweeps/eg_vs_gd.py as a researcher runs it: flags, bad input before Ray, and a smoke
study whose parent MLflow run holds the comparison table and the plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_cli import run

SCRIPT = Path(__file__).resolve().parent.parent / "sweeps" / "eg_vs_gd.py"


def test_help_lists_the_study_flags(tmp_path: Path) -> None:
    out = run(["--help"], tmp_path, script=SCRIPT)
    assert out.returncode == 0
    for flag in ("--smoke-test", "--num-samples", "--datasets", "--optimizers", "--models",
                 "--gpus-per-trial", "--seeds", "lns_madam", "fashion_mnist"):
        assert flag in out.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--optimizers", "adagrad"], ["--optimizers", "invalid choice: 'adagrad'", "adam_eg"]),
    (["--datasets", "cifar10"], ["--datasets", "invalid choice", "fashion_mnist"]),
    (["--seeds", "0"], ["--seeds=0 is invalid", ">= 1"]),
    (["--optimizers", "adam_eg", "--set", "optim.eps=0"], ["optim.eps", "> 0"]),
    (["--optimizers", "lns_madam", "--set", "optim.lns_bits=40"], ["optim.lns_bits", "<= 16"]),
    # A field the optimizer does not read: named, with the optimizers that read it.
    (["--set", "optim.lns_bits=4", "--set", "optim.name=eg"],
     ["optim.lns_bits=4", "optim.name=eg does not read it", "lns_madam"]),
    (["--set", "optim.name=eg"], ["optim.name", "--optimizers"]),
])
def test_bad_input_fails_before_any_ray_work(tmp_path: Path, tiny_root: Path,
                                             args: list[str], fragments: list[str]) -> None:
    out = run(args, tmp_path, tiny_root, timeout=60, script=SCRIPT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.ray
def test_smoke_study_records_the_table_and_plots(smoke_study, tmp_path: Path,
                                                 tiny_root: Path) -> None:
    folder, out = smoke_study
    assert "| mnist | mlp | gd |" in out.stdout and "| mnist | mlp | eg |" in out.stdout

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eg_vs_gd")
    runs = client.search_runs([exp.experiment_id])
    study = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(study) == 1 and study[0].info.status == "FINISHED"
    study_id = study[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study_id]
    assert sorted(r.data.tags["kind"] for r in children) == ["points", "search", "search"]
    child_ids = {r.info.run_id for r in children}
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in child_ids]
    assert len(trials) == 2 * 2 + 2 * 2  # 2 searched per cell, then 2 cells x 2 seeds

    listed = [f.path for f in client.list_artifacts(study_id)]
    # The UI lists artifacts by name: the readable table first, its CSV after the plot.
    assert listed[:3] == ["comparison.md", "comparison.png", "comparison.table.csv"]
    assert {"pairs.md", "pairs.table.csv", "curves.png", "sensitivity.png",
            "weights.png"} <= set(listed)
    # Its Overview (the run description) is the compact table and the paired verdicts.
    overview = study[0].data.tags["mlflow.note.content"]
    assert "| dataset | model | optimizer | result | ci95 | seeds_ok |" in overview
    assert "| mnist | mlp | eg - gd | 2 |" in overview
    assert "| mnist | mlp | eg - gd | 2 |" in out.stdout  # the paired comparison, 2 seeds
    local = client.download_artifacts(study_id, "comparison.table.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert [r["optimizer"] for r in rows] == ["gd", "eg"]
    for row in rows:
        assert row["n_seeds"] == "2" and 0.0 <= float(row["test_acc_mean"]) <= 1.0
        assert row["seeds_asked"] == "2" and row["seeds_failed"] == "0"
        assert int(row["seeds_ok"]) + int(row["seeds_diverged"]) == 2 and row["ci95"]
        assert float(row["weight_kurtosis"]) == float(row["weight_kurtosis"])  # not NaN
        assert all(" +- " in row[f"test_acc_{f}"] for f in ("lns8", "lns4", "int8", "int4"))
    # The rounding ran inside each seed trial: its metrics and file are on the trial run.
    seeds = next(r for r in children if r.data.tags["kind"] == "points")
    for trial in (r for r in trials if r.data.tags["mlflow.parentRunId"] == seeds.info.run_id):
        rounded = {f"test_acc_{f}" for f in ("lns8", "lns4", "int8", "int4")}
        assert rounded <= set(trial.data.metrics)
        assert "weight_rounding.json" in {f.path for f in client.list_artifacts(
            trial.info.run_id)}
    # Disk: the search trials' checkpoints are gone once the study ended; the seeds' stay.
    storage = folder / "ray_results"
    assert list(storage.glob("*-searches/trial_*"))  # the cells' folder: seen below
    assert not list(storage.glob("*-search*/trial_*/checkpoint_*"))
    assert len({p.parent for p in storage.glob("*-seeds/trial_*/checkpoint_*")}) == 4
    # The picked configs' seed re-runs carry their checkpoint; search trials do not.
    for trial in trials:
        final = trial.data.tags["mlflow.parentRunId"] == seeds.info.run_id
        assert ("checkpoint" in {f.path for f in client.list_artifacts(
            trial.info.run_id)}) == final
    metrics = study[0].data.metrics
    assert "mnist.mlp.eg.test_acc_mean" in metrics and "mnist.mlp.gd.test_acc_std" in metrics
    searches = [r for r in children if r.data.tags["kind"] == "search"]
    assert all(r.data.tags["picked_trial_id"] for r in searches)
    # The cells searched side by side in one Tune run, each its own run with its trials.
    assert len({r.data.tags["tune_folder"] for r in searches}) == 1
    spans = {r.data.tags["cell"]: r.data.tags["tune_points"] for r in searches}
    assert spans == {"mnist/mlp/gd": "0:2", "mnist/mlp/eg": "2:4"}
    for search in searches:
        optimizer = search.data.tags["cell"].split("/")[-1]
        own = [t for t in trials if t.data.tags["mlflow.parentRunId"] == search.info.run_id]
        assert len(own) == 2 and {t.data.tags["optimizer"] for t in own} == {optimizer}
        assert search.data.tags["picked_trial_id"] in {t.data.tags["trial_id"] for t in own}

    # The same report from the runs alone: the picked configs are read back, not re-picked
    # (it logs the same tables on the study run again: the shared store stays as it was).
    table = out.stdout.split("test_acc over seeds per cell ===")[1].split("MLflow")[0]
    again = run(["--smoke-test", "--optimizers", "gd", "eg", "--report-from", study_id],
                folder, tiny_root, timeout=300, script=SCRIPT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split("test_acc over seeds per cell ===")[1].split("MLflow")[0] \
        == table


def test_lns_madam_weights_round_to_themselves_in_lns8() -> None:
    """Why the study shows lns_madam's LNS-8 column as a no-op: its weights are already on
    weight rounding's lns8 grid (8 bits, 3 fractional, aligned to each tensor's max)."""
    import torch

    import optim
    from trainables.stages.weight_rounding import FORMATS, round_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 10))
    opt = optim.build_for_model("lns_madam", model, bias_lr=0.01, lr=0.125)
    for _ in range(50):
        opt.zero_grad()
        model(torch.randn(32, 50)).pow(2).mean().backward()
        opt.step()
    _, sqnr = round_weights(model, FORMATS["lns8"])
    assert sqnr == {"0.weight": float("inf"), "2.weight": float("inf")}  # exact


def test_bias_mode_all_runs_every_optimizer_on_every_parameter() -> None:
    from sweeps.eg_vs_gd import parse_args, study

    args = parse_args(["--smoke-test", "--set", "optim.bias_mode=all"])
    for cell in study(args).cells:
        assert cell.base.optim.bias_mode == "all"
        assert "optim.bias_lr" not in dict(cell.space.constants)
