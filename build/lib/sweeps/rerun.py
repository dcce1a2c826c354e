"""Re-run one trial from its MLflow run id: its logged config (config.yaml), in this
process, no Ray; warns when this code's git SHA, or a library's version, differs from
what the run was made with. The result prints beside the run's own final metrics.

    python -m sweeps.rerun 3f2a...c9
    python -m sweeps.rerun 3f2a...c9 --set train.epochs=1 --tracking-uri sqlite:///x.db
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from sweeps.provenance import describe_drift, git_sha
from sweeps.tracking import existing_store
from trainables.config import ConfigError, TrialConfig, dotted_keys

__all__ = ["logged_config", "main"]

SHOWN = ("test_acc", "val_acc", "test_acc_q", "train_loss")


def logged_config(client: Any, run_id: str) -> TrialConfig:
    """The config a trial run logged (its config.yaml artifact). Keys this code no longer
    has are dropped with a warning naming them: the re-run cannot honour them."""
    import yaml

    try:
        run = client.get_run(run_id)
    except Exception:  # MLflow raises its own kinds for an unknown id
        raise ConfigError(f"run {run_id!r} is not in this tracking store") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run.info.run_id, "config.yaml", tmp)
        except Exception:
            raise ConfigError(f"run {run_id!r} has no config.yaml: allowed the run id of a "
                              "trial (a sweep's or study's nested run)") from None
        stored = dotted_keys(yaml.safe_load(Path(path).read_text()) or {})
    known = set(TrialConfig().to_flat())
    removed = sorted(set(stored) - known)
    if removed:
        print(f"warning: run {run_id} set {', '.join(f'{k}={stored[k]!r}' for k in removed)}"
              ", which this code no longer has: re-run without", file=sys.stderr)
    return TrialConfig.from_stored({k: v for k, v in stored.items() if k in known})


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    from trainables.loop import run_trial
    from trainables.sessions import LocalSession

    parser = argparse.ArgumentParser(prog="python -m sweeps.rerun",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="a trial's MLflow run id")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="change a field of the logged config")
    args = parser.parse_args(argv)
    try:
        client = MlflowClient(existing_store(args.tracking_uri))
        cfg = logged_config(client, args.run_id).with_overrides(args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = client.get_run(args.run_id)
    logged_sha, here = run.data.tags.get("git_sha", "unknown"), git_sha()
    if logged_sha != here:
        print(f"warning: run {args.run_id} was made with code {logged_sha}; this is {here}: "
              "numbers may differ", file=sys.stderr)
    drift = describe_drift(run.data.tags)
    if drift:
        print(f"warning: library versions differ: {drift}: numbers may differ",
              file=sys.stderr)
    print(f"re-running {run.info.run_name} ({args.run_id})", flush=True)
    history = run_trial(cfg.replace({"train.checkpoint": False}), LocalSession())
    final = history[-1]
    for key in SHOWN:
        if key in final or key in run.data.metrics:
            print(f"  {key}: now {final.get(key, float('nan')):.4f}, logged "
                  f"{run.data.metrics.get(key, float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
