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


def interleaved_train_seconds(base: Any, variants: dict[str, list[str]], repeats: int
                              ) -> dict[str, list[float]]:
    """Epoch training seconds of ``base`` ("fp32") and each variant (its overrides),
    through qsweep's own loop, run interleaved (fp32, a, b, fp32, a, b, ...) after a
    warm-up, so machine noise hits all alike."""
    from trainables import LocalSession, run_trial

    configs = {"fp32": base, **{k: base.with_overrides(v) for k, v in variants.items()}}
    run_trial(base.with_overrides(["data.train_subset=512"]), LocalSession())  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(repeats):
        for name, cfg in configs.items():
            seconds[name].append(run_trial(cfg, LocalSession())[-1]["train_seconds"])
    return seconds


def ratio_rows(seconds: dict[str, list[float]], prefix: str = "") -> dict[str, Any]:
    """Per variant: median seconds and its ratio to fp32's, printed as rows. Noise on
    this VM only adds time: the ratio of the fastest runs, the steadier figure, is
    printed beside the median ratio."""
    import statistics

    fp32 = statistics.median(seconds["fp32"])
    results = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        fastest = min(values) / min(seconds["fp32"])
        results[name] = {"train_seconds_median": median, "ratio_to_fp32": median / fp32,
                         "ratio_of_fastest": fastest}
        row(f"{prefix}{name}", train_s=median, ratio=median / fp32, ratio_fastest=fastest,
            runs=" ".join(f"{v:.2f}" for v in values))
    return results
