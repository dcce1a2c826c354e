"""A light MLflow UI for this machine's sweeps: ``mlflow server`` bound to 127.0.0.1 with
one worker and MLflow's job execution off (its defaults started 15 processes and 2.7-3.1
GiB here, 7 s to answer; this: 2 processes, ~0.5 GiB, the same pages).

    python -m sweeps.ui                                   # ./mlflow.db on port 5000
    python -m sweeps.ui --tracking-uri sqlite:////path/mlflow.db --port 5001

Artifacts of a local store live in ``mlartifacts/`` beside ``mlflow.db``, under absolute
``file://`` locations: keep the two together at the same path (to look at a copy made
elsewhere, put it at the same absolute path, e.g. with a symlink).
"""

from __future__ import annotations

import argparse
import os
import sys

from sweeps.tracking import existing_store
from trainables.config import ConfigError

__all__ = ["server_command", "server_env", "experiment_urls", "main"]


def server_command(tracking_uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    # This interpreter's mlflow (another one on PATH may be another version).
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def experiment_urls(tracking_uri: str, port: int) -> dict[str, str]:
    """Each experiment's runs table in the model-training view (MLflow 3.17's UI opens
    on a GenAI overview unless the link says ``workflowType=machine_learning``)."""
    from mlflow.tracking import MlflowClient

    return {e.name: f"http://127.0.0.1:{port}/#/experiments/{e.experiment_id}/runs"
                    "?workflowType=machine_learning"
            for e in MlflowClient(tracking_uri).search_experiments()
            if e.name != "Default"}


def server_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.ui",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        uri = existing_store(args.tracking_uri)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = server_command(uri, args.port)
    print(f"MLflow UI on http://127.0.0.1:{args.port}  (Ctrl-C stops it)", flush=True)
    for name, url in experiment_urls(uri, args.port).items():
        print(f"  {name}: {url}", flush=True)
    os.execvpe(command[0], command, server_env())
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
