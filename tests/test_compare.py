"""The study's comparison: hand-computed means, stds, lr ranges and weight statistics."""

from __future__ import annotations

import math

import pytest
import torch

from sweeps.compare import CellResult, mean_ci, paired_rows, table_rows, weight_stats, weight_vector
from sweeps.search import validate_points
from sweeps.spec import Sweep
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
    from sweeps.compare import plot_cell_curves, plot_sensitivity, plot_weights

    nan = float("nan")
    cell = CellResult(("mnist", "mlp", "gd"), [{"optim.lr": 1.0, "test_acc": 0.9,
                                              "status": "FINISHED"}], {"optim.lr": 1.0})
    cell.add_seed_run(1, _history([0.9, 0.95]), torch.tensor([0.5, -1.0, 2.0]))
    cell.add_seed_run(2, [{"epoch": 1, "test_acc": 0.1, "train_loss": nan},
                          {"epoch": 2, "test_acc": 0.1, "train_loss": nan}],
                      torch.tensor([nan, 1.0, -nan]))
    [row] = table_rows([cell], KEYS)
    assert row["test_acc_mean"] == pytest.approx(0.525) and math.isnan(row["weight_kurtosis"])
    assert row["seeds_diverged"] == 1
    for plot in (plot_cell_curves, plot_sensitivity, plot_weights):
        assert plot([cell], tmp_path / f"{plot.__name__}.png").stat().st_size > 0


# t quantiles (0.975) by hand from tables: df 1 -> 12.7062, df 2 -> 4.3027.
T975 = {1: 12.706204736174698, 2: 4.302652729911275}


def test_confidence_interval_and_seed_counts_by_hand():
    cell = CellResult(("mnist", "mlp", "eg"), [], {}, chance=0.1, asked=5)
    cell.add_seed_run(1, _history([0.5, 0.96]), None)
    cell.add_seed_run(2, _history([0.5, 0.98]), None)
    frozen = _history([0.11, 0.1135])  # finite loss, accuracy at chance: it froze
    cell.add_seed_run(3, frozen, None)
    cell.add_failed_seed(4)  # raised: counted, not dropped; seed 5 never reported
    [row] = table_rows([cell], KEYS)
    values = [0.96, 0.98, 0.1135]
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = T975[2] * std / math.sqrt(3)
    assert row["test_acc_mean"] == pytest.approx(mean)
    assert row["test_acc_ci95_lo"] == pytest.approx(mean - half)
    assert row["test_acc_ci95_hi"] == pytest.approx(mean + half)
    assert row["ci95"] == f"{100 * (mean - half):.2f}..{100 * (mean + half):.2f}"
    assert (row["seeds_asked"], row["seeds_ok"], row["seeds_diverged"], row["seeds_failed"],
            row["seeds_missing"], row["n_seeds"]) == (5, 2, 1, 1, 1, 3)


def test_a_non_finite_loss_at_any_epoch_is_diverged_and_one_seed_has_no_interval():
    cell = CellResult(("mnist", "mlp", "eg"), [], {}, chance=0.1)
    history = _history([0.9, 0.95])
    history[0]["train_loss"] = float("nan")
    cell.add_seed_run(1, history, None)
    [row] = table_rows([cell], KEYS)
    assert row["seeds_diverged"] == 1 and row["seeds_ok"] == 0 and row["seeds_asked"] == 1
    assert math.isnan(row["test_acc_ci95_lo"]) and row["ci95"] == ""


def test_notes_replace_a_column_known_without_measuring():
    cell = CellResult(("mnist", "mlp", "lns_madam"), [], {})
    history = _history([0.9, 0.95])
    history[-1]["test_acc_lns8"] = 0.95
    cell.add_seed_run(1, history, None)
    notes = {("mnist", "mlp", "lns_madam"): {"test_acc_lns8": "= test_acc (on its grid)"}}
    [row] = table_rows([cell], KEYS, extra_metrics=("test_acc_lns8",), notes=notes)
    assert row["test_acc_lns8"] == "= test_acc (on its grid)"


def test_paired_differences_by_hand():
    eg = CellResult(("mnist", "mlp", "eg"), [], {})
    gd = CellResult(("mnist", "mlp", "gd"), [], {})
    for seed, a, b in ((1, 0.97, 0.96), (2, 0.98, 0.965), (3, 0.975, 0.97)):
        eg.add_seed_run(seed, _history([a]), None)
        gd.add_seed_run(seed, _history([b]), None)
    gd.add_seed_run(4, _history([0.5]), None)  # no eg partner: not in the pairs
    other = CellResult(("mnist", "cnn", "eg"), [], {})  # no gd in its panel: no row
    other.add_seed_run(1, _history([0.9]), None)
    rows = paired_rows([eg, gd, other], (("eg", "gd"),), KEYS)
    assert len(rows) == 1
    [row] = rows
    diffs = [0.01, 0.015, 0.005]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = T975[2] * std / math.sqrt(3)
    assert (row["dataset"], row["model"], row["pair"], row["n_pairs"], row["first_wins"]) == (
        "mnist", "mlp", "eg - gd", 3, 3)
    assert row["mean_diff"] == pytest.approx(mean)
    assert row["ci95_lo"] == pytest.approx(mean - half) and mean - half < 0  # 0.01 - 0.0124
    assert row["verdict"] == "not resolved" and row["diff_points"] == "+1.00"
    # Seed-by-seed differences that all agree resolve it.
    tight = CellResult(("mnist", "mlp", "gd"), [], {})
    for seed, b in ((1, 0.96), (2, 0.97), (3, 0.965)):
        tight.add_seed_run(seed, _history([b]), None)
    [row] = paired_rows([eg, tight], (("eg", "gd"),), KEYS)
    assert row["verdict"] == "eg better" and row["ci95_lo"] > 0
    assert mean_ci([0.5])[0] == 0.5 and math.isnan(mean_ci([0.5])[1])


def test_a_nan_seed_is_left_out_of_the_pair_and_counted():
    eg = CellResult(("mnist", "mlp", "eg"), [], {})
    gd = CellResult(("mnist", "mlp", "gd"), [], {})
    for seed, a, b in ((1, 0.9, 0.8), (2, 0.91, 0.81), (3, float("nan"), 0.8), (4, 0.92, 0.82)):
        eg.add_seed_run(seed, _history([a]), None)
        gd.add_seed_run(seed, _history([b]), None)
    [row] = paired_rows([eg, gd], (("eg", "gd"),), KEYS)
    assert row["n_pairs"] == 3 and row["non_finite_pairs"] == 1
    assert row["mean_diff"] == pytest.approx(0.1) and row["verdict"] == "eg better"


def test_chance_is_relative_to_the_headroom():
    from sweeps.outcome import at_chance

    assert at_chance(0.1135, 0.1) and not at_chance(0.15, 0.1)
    assert at_chance(0.52, 0.5) and not at_chance(0.70, 0.5)  # 2 classes: 0.70 learned
    assert at_chance(float("nan"), 0.1)


def test_two_equal_differences_are_no_verdict():
    eg = CellResult(("mnist", "mlp", "eg"), [], {})
    gd = CellResult(("mnist", "mlp", "gd"), [], {})
    for seed in (1, 2):  # identical differences: a zero-width interval
        eg.add_seed_run(seed, _history([0.9]), None)
        gd.add_seed_run(seed, _history([0.91]), None)
    [row] = paired_rows([eg, gd], (("eg", "gd"),), KEYS)
    assert row["ci95_lo"] == row["ci95_hi"] and row["verdict"] == "n < 3"
