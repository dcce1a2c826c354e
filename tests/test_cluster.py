"""cluster/gpu.yaml passes Ray's own launcher config validation and carries the project."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "cluster" / "gpu.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_ray_validates_the_prepared_config(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # merges the AWS defaults, as `ray up`
    validate_config(prepared)  # jsonschema against ray-schema.json + cross-field checks
    assert prepared["head_node_type"] == "head"


def test_a_broken_config_is_refused(config: dict) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_t4"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cpu_head_gpu_workers_and_bounds(config: dict) -> None:
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers and all(v["node_config"]["InstanceType"].startswith(("g4dn", "g5"))
                           for v in workers.values())
    assert all(0 <= v["min_workers"] <= v["max_workers"] for v in workers.values())
    assert config["max_workers"] >= max(v["min_workers"] for v in workers.values())


def test_every_node_installs_the_project(config: dict) -> None:
    assert config["file_mounts"] == {"~/qsweep": "."}
    setup = "\n".join(config["setup_commands"])
    assert "pip install -e ~/qsweep" in setup
    assert "prepare_data" in setup
    assert ".venv" in config["rsync_exclude"]


def test_no_credentials(config: dict) -> None:
    text = CONFIG.read_text().lower()
    for secret in ("aws_access_key", "aws_secret", "secret_access_key", "password", "token"):
        assert secret not in text
    assert not re.search(r"akia[0-9a-z]{16}", text)  # an AWS access key id
    assert "ssh_private_key" not in config.get("auth", {})


def test_gpus_per_trial_auto_sees_the_gpus_the_autoscaler_can_add(tmp_path: Path) -> None:
    """ray submit cluster/gpu.yaml: no GPU node runs yet when the driver starts; auto reads
    the launcher's config (the head's ~/ray_bootstrap_config.yaml) instead."""
    from sweeps.runner import autoscaler_gpus, gpu_share

    # 8 x T4 (1 GPU) + 2 x g5.12xlarge (4 GPUs), at most 8 workers of 4 GPUs
    assert autoscaler_gpus(CONFIG) == 16.0
    assert gpu_share(autoscaler_gpus(CONFIG), 16, 1) == 1.0
    assert gpu_share(autoscaler_gpus(CONFIG), 64, 1) == 0.25
    assert autoscaler_gpus(tmp_path / "missing.yaml") == 0.0
    (tmp_path / "cpu.yaml").write_text("max_workers: 2\navailable_node_types:\n"
                                       "  cpu: {resources: {CPU: 8}, max_workers: 2}\n")
    assert autoscaler_gpus(tmp_path / "cpu.yaml") == 0.0
