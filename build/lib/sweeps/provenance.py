"""Where a result came from: code version, host, library versions (no Ray, no MLflow import).

Sweeps tag every MLflow run with :func:`environment_tags`; benchmarks print
:func:`versions` in their header. Both read the same facts, so a benchmark line and a
tracked run of the same code carry the same git SHA.

Example::

    from sweeps.provenance import git_sha, versions
    print(git_sha(), versions())
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

__all__ = ["git_sha", "versions", "environment_tags", "version_drift", "describe_drift"]

_PROJECT_DIR = Path(__file__).resolve().parent.parent
_LIBRARIES = ("torch", "torchvision", "ray", "mlflow", "optuna", "numpy")


def git_sha() -> str:
    """The project's commit (``-dirty`` if changed), or ``$QSWEEP_GIT_SHA``, or unknown."""
    if os.environ.get("QSWEEP_GIT_SHA"):
        return os.environ["QSWEEP_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_PROJECT_DIR, text=True,
                             capture_output=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=_PROJECT_DIR, text=True, capture_output=True,
                               timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Python and the installed versions of the libraries a result depends on (read from
    package metadata, so nothing heavy is imported)."""
    found = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def environment_tags() -> dict[str, str]:
    """Code version, host and library versions: what a result needs to be reproduced."""
    sha = git_sha()
    return {"git_sha": sha, "hostname": socket.gethostname(), **versions(),
            "mlflow.source.git.commit": sha.removesuffix("-dirty")}


def version_drift(recorded: dict[str, str]) -> list[tuple[str, str, str]]:
    """(library, version the run recorded, version installed here) for each library whose
    versions differ; a run's tags are ``recorded``. A library the run did not record (an
    older run) is not compared; one not installed here reads "not installed"."""
    here = versions()
    return [(name, recorded[name], here.get(name, "not installed"))
            for name in ("python", *_LIBRARIES)
            if name in recorded and recorded[name] != here.get(name, "not installed")]


def describe_drift(recorded: dict[str, str]) -> str:
    """One line naming the differing versions ("" when none): e.g. ``optuna 5.0.0 (run)
    vs 5.1.0 (installed)``."""
    drift = version_drift(recorded)
    return ", ".join(f"{name} {then} (run) vs {now} (installed)" for name, then, now in drift)
