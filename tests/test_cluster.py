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
    from sweeps.ray_env import autoscaler_gpus, gpu_share

    # 8 x T4 (1 GPU) + 2 x g5.12xlarge (4 GPUs), at most 8 workers of 4 GPUs
    assert autoscaler_gpus(CONFIG) == 16.0
    assert gpu_share(autoscaler_gpus(CONFIG), 16, 1) == 1.0
    assert gpu_share(autoscaler_gpus(CONFIG), 64, 1) == 0.25
    assert autoscaler_gpus(tmp_path / "missing.yaml") == 0.0
    (tmp_path / "cpu.yaml").write_text("max_workers: 2\navailable_node_types:\n"
                                       "  cpu: {resources: {CPU: 8}, max_workers: 2}\n")
    assert autoscaler_gpus(tmp_path / "cpu.yaml") == 0.0


# ------------------------------------------------------------------ python -m sweeps.cluster_check
LOCAL = CONFIG.parent / "local.yaml"
REPO = CONFIG.parent.parent


def test_local_yaml_carries_and_installs_the_project() -> None:
    from sweeps.cluster_check import check_cluster_config

    local = yaml.safe_load(LOCAL.read_text())
    assert local["provider"]["type"] == "local"
    assert local["file_mounts"] == {"~/qsweep": "."}
    assert "ssh_private_key" in local["auth"]  # a path to the user's key, not a key
    assert "BEGIN" not in LOCAL.read_text()
    summary = check_cluster_config(LOCAL, cwd=REPO)
    assert summary.startswith("local provider, head ")
    assert "~/qsweep" in check_cluster_config(CONFIG, cwd=REPO)


def _broken(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _edited(edit) -> str:
    config = yaml.safe_load(LOCAL.read_text())
    edit(config)
    return yaml.safe_dump(config)


@pytest.mark.parametrize("text, says", [
    ("cluster_name: x\nprovider: [\n", "not valid YAML (line 3, column 1)"),
    ("- a list\n", "not a mapping of launcher fields"),
    (_edited(lambda c: c.update(max_workers="two")), "max_workers: 'two' is not of type"),
    (_edited(lambda c: c.update(setup_comands=c.pop("setup_commands"))),
     "'setup_comands' was unexpected"),
    (_edited(lambda c: c["provider"].pop("head_ip")), "Ray refuses it: Please supply a "
                                                      "`head_ip`"),
    (_edited(lambda c: c["provider"].update(type="lokal")),
     "Ray refuses it: Unsupported node provider: lokal"),
    (_edited(lambda c: c.update(file_mounts={"~/qsweep": "no/such/folder"})),
     "file_mounts.~/qsweep: no/such/folder does not exist here"),
    (_edited(lambda c: c.update(file_mounts={"~/code": "sweeps"})),
     "file_mounts: nothing carries the qsweep repository"),
    (_edited(lambda c: c.update(setup_commands=["echo hi"])),
     "setup_commands: none installs the carried repository on every node (e.g. pip "
     "install -e ~/qsweep)"),
    (_edited(lambda c: c.update(setup_commands=["pip install -e ~/qsweep2"])),
     "setup_commands: none installs the carried repository"),
    (_edited(lambda c: c.update(setup_commands=[], head_setup_commands=[
        "pip install -e ~/qsweep"])), "setup_commands: none installs"),  # not the workers
    (b"cluster_name: \xff\xfe\n", "cannot be read:"),
])
def test_a_broken_cluster_yaml_gets_one_line_naming_the_field(tmp_path: Path,
                                                               text: str | bytes,
                                                               says: str) -> None:
    """The README's row "invalid cluster YAML": exit 2, one line on stderr, no traceback
    (ray up itself gives a TypeError traceback for max_workers: two)."""
    import subprocess
    import sys

    path = _broken(tmp_path, text)
    out = subprocess.run([sys.executable, "-m", "sweeps.cluster_check", str(path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: "), out.stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_cluster_check_of_a_missing_file_and_of_good_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from sweeps.cluster_check import main

    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"{tmp_path / 'nope.yaml'}: no such file\n"
    monkeypatch.chdir(REPO)  # file_mounts "." is the folder ray up runs in
    assert main(["cluster/local.yaml", "cluster/gpu.yaml"]) == 0
    assert capsys.readouterr().out.count(": ok: ") == 2


@pytest.mark.parametrize("setup", [["pip install -U -e ~/qsweep"], ["pip install -e $HOME/qsweep"],
                                   ["cd ~ && ~/venv/bin/pip install -e ~/qsweep/"]])
def test_every_spelling_of_the_install_passes(tmp_path: Path, setup: list[str]) -> None:
    from sweeps.cluster_check import check_cluster_config

    path = _broken(tmp_path, _edited(lambda c: c.update(setup_commands=setup)))
    assert "installed on every node" in check_cluster_config(path, cwd=REPO)


def test_a_coordinator_address_cluster_is_summarized(tmp_path: Path) -> None:
    from sweeps.cluster_check import check_cluster_config

    def coordinated(config: dict) -> None:
        config["provider"] = {"type": "local", "coordinator_address": "10.0.0.1:1234"}
        config["max_workers"] = 2

    path = _broken(tmp_path, _edited(coordinated))
    assert "head 10.0.0.1:1234" in check_cluster_config(path, cwd=REPO)
