"""Each private Ray attribute qsweep reads (sweeps/ray_private.py), called against the
installed Ray: a Ray release that renames one fails here, by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweeps import ray_private

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def test_addresses_address_file_cpus_and_cluster_validation() -> None:
    assert ray_private.canonical_bootstrap_address(None) is None
    assert ray_private.canonical_bootstrap_address("local") is None
    assert ray_private.canonical_bootstrap_address("127.0.0.1:6379").endswith(":6379")
    assert Path(ray_private.ray_address_file()).name == "ray_current_cluster"
    assert ray_private.ray_num_cpus() >= 1
    config = yaml.safe_load((CLUSTER / "local.yaml").read_text())
    prepared = ray_private.prepare_cluster_config(config)
    assert prepared["provider"]["type"] == "local"


@pytest.mark.ray
def test_tuner_callbacks_and_trials_of_a_run_and_a_restored_run(tmp_path: Path) -> None:
    import ray
    from ray import tune

    class Seen(tune.Callback):
        pass

    def _report(config: dict) -> None:  # defined here: pickled by value, not by module
        tune.report({"x": config["x"]})

    first, second = Seen(), Seen()
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        tuner = tune.Tuner(_report, param_space={"x": tune.grid_search([1, 2])},
                           run_config=tune.RunConfig(name="r", storage_path=str(tmp_path),
                                                     callbacks=[first], verbose=0))
        assert first in ray_private.tuner_callbacks(tuner)
        ray_private.set_tuner_callbacks(tuner, [second])
        assert ray_private.tuner_callbacks(tuner) == [second]
        assert ray_private.restored_trials(tuner) == []
        results = tuner.fit()
        trials = ray_private.result_trials(results)
        assert sorted(t.status for t in trials) == ["TERMINATED", "TERMINATED"]
        assert len({t.trial_id for t in trials}) == 2
        restored = tune.Tuner.restore(str(tmp_path / "r"), _report)
        assert {t.trial_id for t in ray_private.restored_trials(restored)} == \
            {t.trial_id for t in trials}
    finally:
        ray.shutdown()
