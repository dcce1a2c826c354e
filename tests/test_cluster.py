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
