"""sweeps/quant_bits.py as a researcher runs it: flags, bad input before Ray, the Pareto
front by hand, and a smoke multi-objective sweep whose run holds the front."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_cli import run

from sweeps.quant_bits import pareto_front

SCRIPT = Path(__file__).resolve().parent.parent / "sweeps" / "quant_bits.py"


def test_pareto_front_by_hand() -> None:
    rows = [{"trial_id": "a", "val_acc_q": 0.90, "packed_bytes": 100, "status": "FINISHED"},
            {"trial_id": "b", "val_acc_q": 0.95, "packed_bytes": 200, "status": "FINISHED"},
            {"trial_id": "c", "val_acc_q": 0.94, "packed_bytes": 300, "status": "FINISHED"},
            {"trial_id": "d", "val_acc_q": 0.97, "packed_bytes": 400, "status": "FINISHED"},
            {"trial_id": "e", "val_acc_q": 0.99, "packed_bytes": 50, "status": "FAILED"},
            {"trial_id": "f", "val_acc_q": 0.90, "packed_bytes": 100, "status": "FINISHED"}]
    assert [r["trial_id"] for r in pareto_front(rows)] == ["a", "f", "b", "d"]
    assert pareto_front([]) == []


@pytest.mark.parametrize("args, fragments", [
    (["--formats", "posit"], ["--formats", "invalid choice", "codebook"]),
    (["--byte-budget", "-5"], ["--byte-budget=-5", ">= 0"]),
    (["--set", "quant.bits=40"], ["quant.bits", "2..16"]),
])
def test_bad_input_fails_before_any_ray_work(tmp_path: Path, tiny_root: Path,
                                             args: list[str], fragments: list[str]) -> None:
    out = run(args, tmp_path, tiny_root, timeout=120, script=SCRIPT)
    assert out.returncode == 2, out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.ray
def test_smoke_pareto_sweep_records_the_front(tmp_path: Path, tiny_root: Path) -> None:
    out = run(["--smoke-test", "--num-samples", "4", "--address", "local",
               "--set", "model.channels=[4,8]", "--set", "model.hidden=[32]"],
              tmp_path, tiny_root, timeout=600, script=SCRIPT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Pareto front" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quant_bits")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    for trial in trials:
        assert {"val_acc_q", "test_acc_q", "packed_bytes", "compression_ratio"} <= \
            set(trial.data.metrics)
        assert "model.qsw" in {a.path for a in client.list_artifacts(trial.info.run_id)}
    assert {"pareto.table.csv", "pareto.md", "pareto.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "Pareto front" in parent.data.tags["mlflow.note.content"]
    local = client.download_artifacts(parent.info.run_id, "pareto.table.csv", str(tmp_path))
    front = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    # One call brings a trial's quantized model back; it scores what the trial reported.
    import torch

    from sweeps.tracking import load_quantized_model
    from trainables.data import load_splits

    trial = trials[0]
    model, cfg = load_quantized_model(trial.info.run_id, f"sqlite:///{tmp_path / 'mlflow.db'}")
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    correct = total = 0
    with torch.no_grad():
        for x, y in splits.loader("test", 1000, torch.device("cpu"), seed=0):
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    assert correct / total == trial.data.metrics["test_acc_q"]
    sizes = [int(r["packed_bytes"]) for r in front]
    accs = [float(r["val_acc_q"]) for r in front]
    assert sizes == sorted(sizes) and accs == sorted(accs)  # more bytes buy accuracy
