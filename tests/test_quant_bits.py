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
    # A third cost: c (beaten on accuracy and bytes by b) is the cheapest, so it stays.
    costs = {"a": 5.0, "b": 3.0, "c": 1.0, "d": 4.0, "e": 0.1, "f": 6.0}
    for r in rows:
        r["bitops"] = costs[r["trial_id"]]
    assert [r["trial_id"] for r in pareto_front(rows, cost="bitops")] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("args, fragments", [
    (["--formats", "posit"], ["--formats", "invalid choice", "codebook"]),
    (["--byte-budget", "-5"], ["--byte-budget=-5", ">= 0"]),
    (["--objective", "budget", "--cost", "bitops"],
     ["--cost=bitops is invalid with --objective budget", "--objective pareto"]),
    (["--set", "quant.bits=40"], ["quant.bits", "2..16"]),
    (["--per-layer", "--formats", "int", "codebook"],
     ["--formats int codebook is invalid with --per-layer", "int and/or lns"]),
    (["--set", "quant.layer_bits=[4,1]"], ["quant.layer_bits[1]=1", "2..16"]),
    (["--set", "quant.layer_bits=[4,4]"], ["quant.layer_bits=[4, 4] is invalid for this "
                                           "model: allowed 4 bit widths", "features.0"]),
])
def test_bad_input_fails_before_any_ray_work(tmp_path: Path, tiny_root: Path,
                                             args: list[str], fragments: list[str]) -> None:
    out = run(args, tmp_path, tiny_root, timeout=120, script=SCRIPT)
    assert out.returncode == 2, out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr
    assert not (tmp_path / "ray_results").exists()


def _smoke_sweep(tmp_path: Path, tiny_root: Path, *extra: str) -> tuple:
    """A 4-trial smoke sweep of a small LeNet: (output, client, parent run, trial runs),
    every trial FINISHED."""
    out = run(["--smoke-test", *extra, "--num-samples", "4", "--address", "local",
               "--set", "model.channels=[4,8]", "--set", "model.hidden=[32]"],
              tmp_path, tiny_root, timeout=600, script=SCRIPT)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quant_bits").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    return out, client, parent, trials


@pytest.mark.ray
def test_smoke_pareto_sweep_records_the_front(tmp_path: Path, tiny_root: Path) -> None:
    """With latency measured inside each trial as the third objective."""
    out, client, parent, trials = _smoke_sweep(tmp_path, tiny_root, "--cost", "latency")
    assert "Pareto front" in out.stdout
    for trial in trials:
        assert {"val_acc_q", "test_acc_q", "packed_bytes", "compression_ratio", "bitops",
                "deploy_rel_int8_pt2e", "deploy_ms_int8_pt2e"} <= set(trial.data.metrics)
        assert trial.data.metrics["deploy_rel_int8_pt2e"] > 0
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
    assert front and all(float(r["deploy_rel_int8_pt2e"]) > 0 for r in front)


def test_layer_bits_set_each_layers_format_and_must_match_the_model(tiny_root: Path) -> None:
    import torch

    import quant
    from trainables.config import ConfigError, TrialConfig
    from trainables.models import build_model
    from trainables.stages.quant import quant_config, quantizable_layers

    cfg = TrialConfig().with_overrides(["model.name=lenet", "model.channels=[4,8]",
                                        "model.hidden=[32]", "quant.mode=ptq",
                                        "quant.layer_bits=[8,2,4,3]", "quant.per_channel=true"])
    model = build_model(cfg.model, 1, 28, 10)
    layers = quantizable_layers(model)
    assert len(layers) == 4
    config = quant_config(cfg, model)
    assert [config.format_for(n) for n in layers] == [
        quant.IntFormat(b, True, True) for b in (8, 2, 4, 3)]
    quant.quantize_(model, config)
    for name, bits in zip(layers, (8, 2, 4, 3), strict=True):
        levels = torch.unique(model.get_submodule(name).weight_encoded.codes)
        assert len(levels) <= 2 ** bits  # the layer's own width
    with pytest.raises(ConfigError, match=r"quant.layer_bits=\[8, 4\] is invalid for this "
                                          r"model: allowed 4 bit widths, one per layer"):
        quant_config(cfg.with_overrides(["quant.layer_bits=[8,4]"]), model)
    for bad, says in ((["quant.format=codebook"], "quant.layer_bits=[8, 2, 4, 3] is invalid"),
                      (["quant.first_last_bits=8"], "0 when quant.layer_bits gives")):
        with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("]", r"\]")):
            cfg.with_overrides(bad)


def test_the_per_layer_space_folds_its_bits_into_the_config() -> None:
    """Optuna learns from space.bits.<layer>; the trial's config gets quant.layer_bits."""
    from sweeps.quant_bits import LayerBitSpace
    from sweeps.search import DivergenceAwareOptunaSearch, validate_space
    from trainables.config import TrialConfig

    space = LayerBitSpace(layers=("conv1", "conv2", "fc1", "out"))
    base = TrialConfig().with_overrides(["model.name=lenet", "model.channels=[4,8]",
                                         "model.hidden=[32]", "quant.mode=ptq"])
    searched = validate_space(base, space)
    assert "quant.layer_bits" in searched and not any(k.startswith("space.") for k in searched)
    searcher = DivergenceAwareOptunaSearch(space=space, metric="val_acc_q", mode="max")
    config = searcher.suggest("t1")
    assert not any(k.startswith("space.") for k in config)
    bits = config["quant.layer_bits"]
    assert len(bits) == 4 and all(2 <= b <= 8 for b in bits)
    assert searcher._ot_trials["t1"].params["space.bits.fc1"] == bits[2]
    base.replace(config)  # a valid trial config


def test_layer_bits_table_by_hand() -> None:
    from sweeps.quant_bits import layer_bits_table

    configs = {"a": {"quant.format": "int", "quant.layer_bits": [8, 2, 4]},
               "b": {"quant.format": "int", "quant.layer_bits": [8, 4, 2]}}
    rows = layer_bits_table([{"trial_id": "a"}, {"trial_id": "b"}], configs, ("c1", "c2", "o"))
    assert rows == [
        {"layer": "c2", "mean_bits": 3.0, "min_bits": 2, "max_bits": 4, "front_trials": 2},
        {"layer": "o", "mean_bits": 3.0, "min_bits": 2, "max_bits": 4, "front_trials": 2},
        {"layer": "c1", "mean_bits": 8.0, "min_bits": 8, "max_bits": 8, "front_trials": 2}]


@pytest.mark.ray
def test_smoke_per_layer_sweep_reports_the_bits_of_each_layer(tmp_path: Path,
                                                              tiny_root: Path) -> None:
    out, client, parent, trials = _smoke_sweep(tmp_path, tiny_root, "--per-layer",
                                               "--cost", "bitops")
    assert "Bits per layer on the Pareto front" in out.stdout
    assert all(t.data.metrics["bitops"] > 0 for t in trials)
    widths = {t.data.params["quant.layer_bits"] for t in trials}
    assert len(widths) > 1  # each trial its own mix
    assert {"layer_bits.md", "layer_bits.table.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_mixed_precision_trial_is_labelled_mixed() -> None:
    from sweeps.tracking import quant_label

    assert quant_label({"quant.mode": "qat", "quant.format": "int", "quant.bits": 8,
                        "quant.layer_bits": [2, 4]}) == "int-mixed-qat"
    assert quant_label({"quant.mode": "qat", "quant.format": "int", "quant.bits": 8,
                        "quant.layer_bits": []}) == "int8-qat"
