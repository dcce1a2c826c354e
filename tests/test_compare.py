"""The study's comparison: hand-computed means, stds, lr ranges and weight statistics."""

from __future__ import annotations

import math

import pytest
import torch

from sweeps.compare import CellResult, table_rows, weight_stats, weight_vector
from sweeps.runner import Sweep, validate_points
from trainables.config import ConfigError, TrialConfig

KEYS = ("dataset", "model", "optimizer")


def _history(accs):
    return [{"epoch": i + 1, "test_acc": a, "train_loss": 1.0 / (i + 1)}
            for i, a in enumerate(accs)]


def test_table_row_by_hand():
    search = [{"optim.lr": 0.1, "test_acc": 0.95, "status": "FINISHED"},
              {"optim.lr": 0.3, "test_acc": 0.945, "status": "FINISHED"},
              {"optim.lr": 1.0, "test_acc": 0.5, "status": "KILLED"},
              {"optim.lr": 0.05, "test_acc": 0.939, "status": "KILLED"}]
    cell = CellResult(("mnist", "mlp", "eg"), search, {"optim.lr": 0.1,
                                                     "optim.weight_decay": 1e-4})
    cell.add_seed_run(1, _history([0.9, 0.96]), torch.tensor([-1.0, 1.0]))
    cell.add_seed_run(2, _history([0.9, 0.98]), torch.tensor([-2.0, 2.0]))
    [row] = table_rows([cell], KEYS)
    assert row["optimizer"] == "eg" and row["dataset"] == "mnist"
    assert row["test_acc_mean"] == pytest.approx(0.97)
    assert row["test_acc_std"] == pytest.approx(math.sqrt(2) * 0.01)  # sample std of 2
    assert row["result"] == "97.00 +- 1.41" and row["n_seeds"] == 2
    assert row["lr_worked"] == "0.1..0.3"  # within 1 point of 0.95: not 0.939, not 0.5
    assert row["lr_searched"] == "0.05..1" and row["search_best_test_acc"] == 0.95
    assert row["weight_kurtosis"] == pytest.approx(-2.0)  # two-point distribution: 1 - 3


def test_extra_metrics_are_tabled_from_the_final_reports():
    cell = CellResult(("mnist", "mlp", "eg"), [], {})
    for seed, rounded in ((1, 0.90), (2, 0.94)):
        history = _history([0.9, 0.95])
        history[-1]["test_acc_lns4"] = rounded  # a stage's metric joins the last report
        cell.add_seed_run(seed, history, None)
    [row] = table_rows([cell], KEYS, extra_metrics=("test_acc_lns4", "test_acc_int8"))
    assert row["test_acc_lns4"] == "92.00 +- 2.83"
    assert "test_acc_int8" not in row  # not reported: no column


def test_weight_stats_by_hand():
    # w = [1, 2, 4, 8]: log2|w| = 0, 1, 2, 3 -> sample std sqrt(5/3).
    stats = weight_stats(torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64))
    assert stats["log2_abs_std"] == pytest.approx(math.sqrt(5 / 3))
    mean = 3.75
    m2 = sum((x - mean) ** 2 for x in (1, 2, 4, 8)) / 4
    m4 = sum((x - mean) ** 4 for x in (1, 2, 4, 8)) / 4
    assert stats["kurtosis"] == pytest.approx(m4 / m2**2 - 3)


def test_weight_vector_takes_only_matrices_and_kernels():
    state = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.ones(2),
             "conv.weight": torch.ones(1, 1, 2, 2), "bn.num_batches_tracked": torch.tensor(3)}
    assert weight_vector(state).numel() == 6 + 4


def test_points_are_validated_and_varying_keys_reported():
    base = TrialConfig()
    keys = validate_points(base, ({"optim.name": "eg", "train.seed": 1},
                                  {"optim.name": "gd", "train.seed": 2}))
    assert keys == ["optim.name", "train.seed"]
    with pytest.raises(ConfigError, match="point 1 of the sweep is an invalid config: "
                                          "optim.lr=-1.0"):
        validate_points(base, ({}, {"optim.lr": -1.0}))


def test_a_sweep_needs_a_space_or_points():
    with pytest.raises(ConfigError, match="exactly one of space"):
        Sweep(name="x", base=TrialConfig())
    with pytest.raises(ConfigError, match="exactly one of space"):
        Sweep(name="x", base=TrialConfig(), space=lambda t: None, points=({},))


def test_a_diverged_seed_gives_nan_not_a_crash(tmp_path):
    from sweeps.compare import plot_curves, plot_sensitivity, plot_weights

    nan = float("nan")
    cell = CellResult(("mnist", "mlp", "gd"), [{"optim.lr": 1.0, "test_acc": 0.9,
                                              "status": "FINISHED"}], {"optim.lr": 1.0})
    cell.add_seed_run(1, _history([0.9, 0.95]), torch.tensor([0.5, -1.0, 2.0]))
    cell.add_seed_run(2, [{"epoch": 1, "test_acc": 0.1, "train_loss": nan},
                          {"epoch": 2, "test_acc": 0.1, "train_loss": nan}],
                      torch.tensor([nan, 1.0, -nan]))
    [row] = table_rows([cell], KEYS)
    assert row["test_acc_mean"] == pytest.approx(0.525) and math.isnan(row["weight_kurtosis"])
    assert row["diverged"] == 1
    for plot in (plot_curves, plot_sensitivity, plot_weights):
        assert plot([cell], tmp_path / f"{plot.__name__}.png").stat().st_size > 0
