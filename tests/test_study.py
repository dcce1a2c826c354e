"""The study's design without Ray: paired quasi-random points, the pick rule, validation."""

from __future__ import annotations

import math

import pytest

from sweeps.study import Cell, SearchSpace, Study, pick_config
from trainables.config import ConfigError, TrialConfig

LR = (("optim.lr", 0.01, 1.0, True), ("optim.weight_decay", 1e-6, 1e-3, True))


def test_points_are_the_same_quantiles_for_every_range_and_repeat():
    a = SearchSpace(LR).points(8, seed=0)
    b = SearchSpace((("optim.lr", 0.1, 10.0, True), LR[1])).points(8, seed=0)
    assert a == SearchSpace(LR).points(8, seed=0)  # the same command: the same configs
    for p, q in zip(a, b, strict=True):  # paired: the same unit point, another range
        assert math.log(q["optim.lr"] / 0.1) == pytest.approx(math.log(p["optim.lr"] / 0.01))
        assert q["optim.weight_decay"] == p["optim.weight_decay"]
    assert SearchSpace(LR).points(8, seed=1) != a
    lrs = sorted(math.log10(p["optim.lr"]) for p in a)  # log-uniform over [-2, 0]
    assert all(-2 <= x <= 0 for x in lrs)
    # Sobol: each of 8 equal slices of the log range holds exactly one of 8 points.
    assert sorted(int((x + 2) / 2 * 8) for x in lrs) == list(range(8))


def test_constants_and_linear_ranges():
    space = SearchSpace((("model.dropout", 0.0, 0.5, False),), (("optim.bias_lr", 0.05),))
    points = space.points(4, seed=3)
    assert all(p["optim.bias_lr"] == 0.05 and 0 <= p["model.dropout"] <= 0.5 for p in points)
    with pytest.raises(ConfigError, match="optim.lr=0.0..1.0"):
        SearchSpace((("optim.lr", 0.0, 1.0, True),))


def _row(lr, acc, status="FINISHED", diverged=False):
    return {"trial_id": f"t{lr}", "optim.lr": lr, "val_acc": acc, "status": status,
            "diverged": diverged}


def test_pick_backs_off_from_the_edge():
    rows = [_row(0.85, 0.980), _row(0.40, 0.978), _row(0.2, 0.976), _row(0.05, 0.95),
            _row(2.0, 0.99, status="KILLED"), _row(1.5, 0.99, diverged=True)]
    assert pick_config(rows, "val_acc", 0.003, "optim.lr")["optim.lr"] == 0.40
    assert pick_config(rows, "val_acc", 0.0, "optim.lr")["optim.lr"] == 0.85
    assert pick_config(rows, "val_acc", 0.003, None)["optim.lr"] == 0.85
    assert pick_config([_row(1.0, float("nan"))], "val_acc", 0.01, "optim.lr") is None
    # Integer metrics count; a row without the back-off key goes last, not a TypeError.
    rows = [_row(None, 1), _row(0.5, 0.999)]
    assert pick_config(rows, "val_acc", 0.01, "optim.lr")["optim.lr"] == 0.5


def test_a_study_checks_its_shape_at_construction(tiny_root):
    base = TrialConfig().with_overrides([f"data.root={tiny_root}", "optim.name=eg"])
    cell = Cell(("mnist", "eg"), base, SearchSpace(LR))
    with pytest.raises(ConfigError, match="cell mnist/eg is invalid.*3 parts"):
        Study(name="s", cells=(cell,), key_names=("dataset", "model", "optimizer"))
    with pytest.raises(ConfigError, match="pick_within=-0.1"):
        Study(name="s", cells=(cell,), key_names=("dataset", "optimizer"), pick_within=-0.1)
    with pytest.raises(ConfigError, match="at least one range"):
        SearchSpace(())


def test_a_study_validates_every_cell_before_ray(tiny_root):
    base = TrialConfig().with_overrides([f"data.root={tiny_root}", "optim.name=eg"])
    bad = Cell(("mnist", "mlp", "eg"), base, SearchSpace((("optim.momentum", 0.5, 1.5, False),)))
    study = Study(name="s", cells=(bad,), key_names=("dataset", "model", "optimizer"))
    with pytest.raises(ConfigError, match=r"cell mnist/mlp/eg: point \d .*optim.momentum"):
        study.validate()
    with pytest.raises(ConfigError, match="seeds=0"):
        Study(name="s", cells=(bad,), key_names=("a",), seeds=0)
    # train.init_from is checked too (before: studies skipped it, every trial failed in Ray)
    missing = Cell(("mnist", "mlp", "eg"), base.with_overrides(["train.init_from=nowhere"]),
                   SearchSpace(LR))
    study = Study(name="s", cells=(missing,), key_names=("dataset", "model", "optimizer"))
    with pytest.raises(ConfigError, match="train.init_from=.*nowhere' is invalid"):
        study.validate()


def test_the_study_description_fits_mlflows_tag_limit_in_whole_lines():
    """The study run's Overview: the compact table per cell and the verdicts; 32 cells of
    the default study do not fit 8000 characters: the cut keeps whole rows and says so."""
    from types import SimpleNamespace

    from sweeps.study_results import _DESCRIPTION_LIMIT, _description

    study = SimpleNamespace(metric="test_acc", key_names=("dataset", "model", "optimizer"))
    rows = [{"dataset": "fashion_mnist", "model": "cnn", "optimizer": f"opt{i}",
             "result": "87.39 +- 0.05", "ci95": "87.27..87.52", "seeds_ok": 3,
             "seeds_diverged": 0, "seeds_failed": 0, "best_lr": 0.305,
             "weight_kurtosis": 12.0} for i in range(200)]
    pairs = [{"dataset": "mnist", "model": "mlp", "pair": "eg - gd", "n_pairs": 3,
              "first_wins": 1, "diff_points": "-0.15", "ci95": "-0.61..0.30",
              "verdict": "not resolved", "mean_diff": -0.0015}]
    text = _description(study, rows, pairs)
    assert len(text) <= _DESCRIPTION_LIMIT
    assert text.endswith("(cut here: the rest is in comparison.md and pairs.md)")
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in table_lines)  # no row cut in half
    assert "weight_kurtosis" not in text  # compact: only the columns compared first
    short = _description(study, rows[:2], pairs)
    assert "Matched pairs" in short and "| mnist | mlp | eg - gd | 3 | 1 | -0.15 |" in short


@pytest.fixture(scope="module")
def ray_runtime():
    import ray

    ray.init(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.ray
def test_halving_cells_search_side_by_side_and_a_cell_without_rungs_alone(
        ray_runtime, tiny_root, tmp_path):
    """Two 2-epoch cells halve (rung 1) in one shared Tune run, each ranked by itself; a
    1-epoch cell has no rung and runs as its own sweep. Every cell is picked from its own
    trials, and --report-from reads each back from its own folder and points."""
    from conftest import tiny_config
    from mlflow.tracking import MlflowClient

    from sweeps.study import report_from, run_study

    base = tiny_config(tiny_root, "model.name=mlp", "model.hidden=[16]", "train.epochs=2",
                       "data.val_fraction=0.2")
    space = SearchSpace((("optim.lr", 0.01, 0.5, True),))
    cells = (Cell(("gd",), base, space),
             Cell(("one_epoch",), base.replace({"train.epochs": 1}), space),
             Cell(("eg",), base.replace({"optim.name": "eg", "optim.bias_lr": 0.05}),
                  SearchSpace((("optim.lr", 0.1, 5.0, True),))))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = Study(name="mixed", cells=cells, key_names=("cell",), num_samples=3, seeds=1,
                  tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    outcome = run_study(study)

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mixed").experiment_id
    runs = client.search_runs([exp])
    searches = {r.data.tags["cell"]: r for r in runs if r.data.tags.get("kind") == "search"}
    assert {r.info.status for r in searches.values()} == {"FINISHED"}
    folders = {cell: r.data.tags["tune_folder"] for cell, r in searches.items()}
    assert folders["gd"] == folders["eg"] != folders["one_epoch"]
    assert searches["gd"].data.tags["tune_points"] == "0:3"
    assert searches["eg"].data.tags["tune_points"] == "3:6"
    assert "tune_points" not in searches["one_epoch"].data.tags
    for cell, search in searches.items():
        own = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == search.info.run_id]
        assert len(own) == 3
        assert {r.data.tags["optimizer"] for r in own} == \
            {"eg" if cell == "eg" else base.optim.name}
        epochs = sorted(int(r.data.metrics["epoch"]) for r in own)
        # Halving: 3 points at rung 1, the best 2 (ceil 3/2) go on; no rung: all end.
        assert epochs == ([1, 1, 1] if cell == "one_epoch" else [1, 2, 2]) or \
            (cell != "one_epoch" and epochs == [2, 2, 2])  # a tie within pick_within
        assert search.data.tags["picked_trial_id"] in {r.data.tags["trial_id"] for r in own}
    # The table as the study printed it, rebuilt from the runs and folders alone.
    again = report_from(study, outcome.run_id)
    assert again.table == outcome.table
    assert [c.picked_trial_id for c in again.cells] == [c.picked_trial_id for c in outcome.cells]


def test_lists_of_other_lengths_cannot_share_a_tune_run(tiny_root, tmp_path):
    """Tune lays a point over its run's base element by element: a shorter list would
    keep the base's extra elements. Refused before Ray, naming the field."""
    from sweeps.search import validate_points
    from sweeps.spec import Sweep
    from sweeps.together import run_together

    base = TrialConfig().with_overrides([f"data.root={tiny_root}", "model.name=mlp",
                                         "model.hidden=[16,8]"])
    with pytest.raises(ConfigError, match=r"point 1 of the sweep: model.hidden=\[4\] is "
                                          r"invalid in one Tune run .*same length"):
        validate_points(base, ({}, {"model.hidden": [4]}))
    other = base.replace({"model.hidden": [32]})
    cells = (Cell(("a",), base, SearchSpace(LR)), Cell(("b",), other, SearchSpace(LR)))
    with pytest.raises(ConfigError, match=r"cell b: model.hidden=\[32\] is invalid"):
        Study(name="s", cells=cells, key_names=("x",)).validate()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweeps = [Sweep(name="s", base=b, points=({},), tracking_uri=uri, title=t)
              for t, b in (("a", base), ("b", other))]
    with pytest.raises(ConfigError, match=r"sweep b: model.hidden=\[32\] is invalid"):
        run_together(sweeps, "f")
    sweeps[1] = Sweep(name="s", base=base, points=({},), tracking_uri=uri, metric="val_acc",
                      title="c")
    with pytest.raises(ConfigError, match="metric='val_acc' of sweep c is invalid: allowed "
                                          "the same as the first sweep's"):
        run_together(sweeps, "f")
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was recorded


def test_a_retired_cell_run_ends_its_trials_and_a_failed_one_keeps_its_status(tmp_path):
    """--resume of a study whose driver was killed: the cell's run and the trial runs it
    left RUNNING end KILLED, saying why; a cell whose every trial failed stays FAILED."""
    from sweeps.resume import retire_run
    from sweeps.tracking import SweepTracker

    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "s")
    cell = tracker.start_sweep("search a", tags={"kind": "search", "cell": "a"})
    running = tracker.start_trial("t0", {}, {"trial_id": "x_00000"})
    done = tracker.start_trial("t1", {}, {"trial_id": "x_00001"})
    tracker.end_run(done, "FINISHED")
    retire_run(tracker, tracker.get_run(cell), "Interrupted")
    statuses = {r: tracker.get_run(r).info.status for r in (cell, running, done)}
    assert statuses == {cell: "KILLED", running: "KILLED", done: "FINISHED"}
    assert "ran this sweep again" in tracker.get_run(cell).data.tags["mlflow.note.content"]
    failed = tracker.start_sweep("search b", tags={"kind": "search", "cell": "b"})
    tracker.set_tags(failed, {"mlflow.note.content": "every trial failed"})
    tracker.end_run(failed, "FAILED")
    retire_run(tracker, tracker.get_run(failed), "Interrupted")
    assert tracker.get_run(failed).info.status == "FAILED"
    assert tracker.get_run(failed).data.tags["mlflow.note.content"] == "every trial failed"
