"""Check a Ray cluster launcher YAML before ``ray up``: one line naming what is wrong.

    python -m sweeps.cluster_check cluster/local.yaml

``ray up`` validates too, but some mistakes reach it as tracebacks (``max_workers: two``
on a local cluster: ``TypeError: '>' not supported``), and it cannot know what a qsweep
sweep needs on the head: the repository carried by ``file_mounts`` and installed by the
setup commands, else ``ray submit ... sweeps/eg_vs_gd.py`` fails there with
``ModuleNotFoundError``. This runs Ray's own checks (its JSON schema, then the provider's
preparation and the schema again, as ``ray up`` does) and the project's, and starts no
node. Exit 0 and a summary when the file is fine, 2 and ``FILE: problem`` when not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from trainables.config import yaml_problem

__all__ = ["ClusterConfigError", "check_cluster_config", "main"]


class ClusterConfigError(ValueError):
    """A cluster YAML that ``ray up`` would refuse, or that could not run a sweep."""


def check_cluster_config(path: str | Path, cwd: str | Path | None = None) -> str:
    """What ``ray up PATH`` (run in ``cwd``) would start; raises ClusterConfigError."""
    path = Path(path)
    raw = _load(path)
    _schema_errors(raw)
    prepared = _prepare(raw)
    cwd = Path(cwd or os.getcwd())
    _project_errors(prepared, cwd)
    provider = prepared["provider"]
    where = (f"head {provider.get('head_ip', provider.get('coordinator_address'))}, "
             f"{len(provider.get('worker_ips', []))} worker machines"
             if provider["type"] == "local" else
             f"{len(prepared['available_node_types'])} node types, at most "
             f"{prepared['max_workers']} workers")
    return f"{provider['type']} provider, {where}; the project goes to " + \
        ", ".join(_project_mounts(prepared, cwd)) + " and is installed on every node"


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ClusterConfigError("no such file")
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ClusterConfigError(f"cannot be read: {err}") from None
    except yaml.YAMLError as err:
        where, problem = yaml_problem(err)
        raise ClusterConfigError(f"not valid YAML{f' ({where})' if where else ''}: "
                                 f"{problem}") from None
    if not isinstance(config, dict):
        raise ClusterConfigError("not a mapping of launcher fields (cluster_name, provider, "
                                 "...)")
    return config


def _schema_errors(config: dict[str, Any]) -> None:
    """Ray's schema on the fields as written (the defaults ray up adds come later, so a
    field left out is not an error here)."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = [e for e in jsonschema.Draft7Validator(schema).iter_errors(config)
              if e.validator != "required"]
    if errors:
        first = min(errors, key=lambda e: [str(p) for p in e.absolute_path])
        raise ClusterConfigError(_describe(first))


def _describe(error: Any) -> str:
    field = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"{field}: {error.message}"


def _prepare(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's preparation and validation, as in ``ray up``, with Ray's own printing kept
    out (its abort prints a PANIC line before raising)."""
    import jsonschema

    from sweeps.ray_private import prepare_cluster_config

    quiet = io.StringIO()
    logger = logging.getLogger("ray.autoscaler")
    level, logger.level = logger.level, logging.CRITICAL
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            return prepare_cluster_config(copy.deepcopy(config))
    except jsonschema.ValidationError as err:
        raise ClusterConfigError(_describe(err)) from None
    except Exception as err:  # noqa: BLE001  Ray raises Click, Type, Value, Runtime errors
        message = getattr(err, "message", None) or str(err)
        raise ClusterConfigError(f"Ray refuses it: {message}") from None
    finally:
        logger.level = level


def _project_mounts(config: dict[str, Any], cwd: Path) -> list[str]:
    """The remote folders that receive the repository (a local folder holding
    pyproject.toml and sweeps/)."""
    return [remote for remote, local in config.get("file_mounts", {}).items()
            if (_local(local, cwd) / "pyproject.toml").is_file()
            and (_local(local, cwd) / "sweeps").is_dir()]


def _local(source: str, cwd: Path) -> Path:
    folder = Path(os.path.expanduser(source))
    return folder if folder.is_absolute() else cwd / folder


def _project_errors(config: dict[str, Any], cwd: Path) -> None:
    for remote, local in config.get("file_mounts", {}).items():
        if not _local(local, cwd).exists():
            raise ClusterConfigError(f"file_mounts.{remote}: {local} does not exist here "
                                     f"(relative paths are from where ray up runs: {cwd})")
    carried = _project_mounts(config, cwd)
    if not carried:
        raise ClusterConfigError(
            "file_mounts: nothing carries the qsweep repository (e.g. \"~/qsweep\": \".\" "
            "with ray up run from the repository root); the sweep script on the head "
            "would not find the packages")
    everywhere = _installs(config.get("setup_commands", []), carried) or (
        _installs(config.get("head_setup_commands", []), carried)
        and _installs(config.get("worker_setup_commands", []), carried))
    if not everywhere:
        raise ClusterConfigError(
            f"setup_commands: none installs the carried repository on every node (e.g. "
            f"pip install -e {carried[0]}); the sweep script on the head, or trials on "
            "the workers, would not find the packages")


def _installs(commands: list[str], remotes: list[str]) -> bool:
    """Some command is a ``pip install`` naming one of ``remotes`` (~ and $HOME alike)."""
    import shlex

    def same(path: str) -> str:
        return path.replace("$HOME", "~").replace("${HOME}", "~").rstrip("/")

    wanted = {same(r) for r in remotes}
    for command in commands:
        for part in command.replace("&&", ";").split(";"):
            try:
                words = shlex.split(part, posix=False)
            except ValueError:
                continue
            if "pip" in {w.rsplit("/", 1)[-1] for w in words} and "install" in words and \
                    wanted & {same(w.strip("'\"")) for w in words}:
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.cluster_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="+", help="cluster launcher YAML(s)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.config:
        try:
            print(f"{path}: ok: {check_cluster_config(path)}")
        except ClusterConfigError as err:
            print(f"{path}: {err}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
