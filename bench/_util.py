"""What every benchmark prints: environment header, aligned rows, one closing JSON line."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def header(name: str) -> dict[str, Any]:
    import torch

    from sweeps.provenance import git_sha

    env = {"bench": name, "git_sha": git_sha(), "torch": torch.__version__,
           "cpus": os.cpu_count(), "python": platform.python_version(),
           "machine": platform.processor() or platform.machine(),
           "data_root": os.environ.get("QSWEEP_DATA", "data")}
    print(f"== {name} ==  " + "  ".join(f"{k}={v}" for k, v in env.items() if k != "bench"))
    return env


def row(label: str, **values: Any) -> None:
    cells = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in values.items())
    print(f"  {label:<34} {cells}")


def finish(env: dict[str, Any], results: dict[str, Any]) -> None:
    print(json.dumps({**env, **results}, sort_keys=True, default=str))
