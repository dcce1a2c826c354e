"""Flags every sweep script shares, and the summary it prints at the end."""

from __future__ import annotations

import argparse
import errno
import math
import os
import shlex
import sys
from typing import Any, Callable, Sequence

from sweeps.tracking import default_tracking_uri, existing_store
from trainables.config import ConfigError, TrialConfig
from trainables.data import DataNotFoundError

__all__ = ["common_parser", "add_trial_flags", "base_config", "tracking_uri", "sweep_options",
           "print_summary", "main_guard", "resume_run_id", "resume_command"]


def common_parser(description: str, num_samples: int, max_concurrent: int,
                  epochs: int) -> argparse.ArgumentParser:
    """The flags of a sweep script: how many trials, then every trial flag."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-samples", type=int, default=num_samples,
                   help="trials Optuna proposes")
    p.add_argument("--max-concurrent", type=int, default=max_concurrent,
                   help="trials running at once")
    add_trial_flags(p, epochs, "epochs per trial (ASHA max_t)")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny subset, few trials: checks the whole path in minutes")
    return p


def add_trial_flags(p: argparse.ArgumentParser, epochs: int | None, epochs_help: str) -> None:
    """Flags of what one trial is and where it runs and is recorded (sweeps and
    ``python -m sweeps.train`` alike)."""
    p.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: $QSWEEP_DATA, else ./data)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
                        "in the working directory); an http:// server works too")
    p.add_argument("--storage-path", default="ray_results",
                   help="Ray Tune results and checkpoints (shared storage on a cluster)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: join the cluster running on this "
                        "node, as under `ray submit`, else start an embedded one; 'local': "
                        "always start an embedded one)")
    p.add_argument("--seed", type=int, default=0, help="searcher seed and base trial seed")
    p.add_argument("--num-workers", type=int, default=1,
                   help="data-parallel workers per trial (>1: Ray Train DDP)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=_gpus, default="auto",
                   help="GPUs per worker (fractional shares a GPU between trials); 0: CPU; "
                        "auto: the cluster's GPUs shared by --max-concurrent trials (0 "
                        "where it has none)")
    p.add_argument("--config", default=None, help="YAML file of config overrides")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override, e.g. --set optim.momentum=0.8")
    p.add_argument("--max-failures", type=int, default=1,
                   help="restarts of a failed trial (a killed worker, a preempted node) from "
                        "its last checkpoint before it counts as FAILED")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="RUN_ID",
                   help="go on with an interrupted or killed run of this script (default: "
                        "the newest unfinished one; or the given run id), same flags")


def resume_run_id(args: argparse.Namespace, experiment: str, kind: str) -> str | None:
    """The run ``--resume`` names: the given id, or the newest unfinished run of
    ``experiment`` with tag ``kind`` (an error naming the flag where there is none)."""
    from sweeps.resume import find_resumable

    if args.resume is None:
        return None
    uri = existing_store(tracking_uri(args))  # nothing to resume in a store not there
    return find_resumable(uri, experiment, kind) if args.resume == "last" else args.resume


def resume_command(run_id: str) -> str:
    """This command line with ``--resume run_id`` (in place of any --resume it had)."""
    argv, kept, skip = sys.argv[1:], [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["python", sys.argv[0], *kept, "--resume", run_id])


def base_config(args: argparse.Namespace, defaults: Sequence[str],
                smoke: Sequence[str]) -> TrialConfig:
    """Script defaults, then --smoke-test sizes, --config file, flags and --set overrides."""
    cfg = TrialConfig().with_overrides(defaults)
    if args.smoke_test:
        cfg = cfg.with_overrides(smoke)
    if args.config:
        cfg = cfg.with_yaml(args.config)
    flags = [f"train.seed={args.seed}", f"train.num_workers={args.num_workers}",
             f"train.cpus_per_worker={args.cpus_per_worker}"]
    # The smoke test keeps its own (short) epochs; no --epochs keeps the config's.
    if args.epochs is not None and not args.smoke_test:
        flags.insert(0, f"train.epochs={args.epochs}")
    if args.gpus_per_trial != "auto" and args.gpus_per_trial > 0:
        _check_gpus_reachable(args)
        flags += ["train.use_gpu=true", f"train.gpus_per_worker={args.gpus_per_trial}"]
    if args.data_root:
        flags.append(f"data.root={args.data_root}")
    # One validated step: --epochs 4 with --set lc.steps=2 is checked as a whole.
    cfg = cfg.with_overrides([*flags, *args.overrides])
    check_trial_fits(args, cfg)
    return cfg


def _gpus(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed auto or a number of "
                                         "GPUs per worker from 0 to 64")
    return value


def _embedded_cluster(args: argparse.Namespace) -> bool:
    """Whether this sweep will start its own Ray on this machine (no --address, no
    RAY_ADDRESS, no `ray start` cluster here): then this machine's CPUs and GPUs are all
    it will ever have."""
    from sweeps.ray_env import ray_start_cluster_answers

    if args.address == "local":  # wins over RAY_ADDRESS and a running cluster
        return True
    return not (args.address is not None or os.environ.get("RAY_ADDRESS") or
                ray_start_cluster_answers())


def _check_gpus_reachable(args: argparse.Namespace) -> None:
    """An embedded Ray cluster on a machine without a GPU can never place a GPU trial:
    Ray would wait forever. Say so before starting."""
    import torch

    if _embedded_cluster(args) and torch.cuda.device_count() == 0:
        raise ConfigError(f"--gpus-per-trial {args.gpus_per_trial} is invalid here: this "
                          "machine has no GPU and no Ray cluster is running to provide one; "
                          "allowed 0 (CPU), or --address of a cluster with GPUs")


RAY_UNITS = 10_000  # Ray counts resources in fixed point: 1/10000 of a CPU or GPU


def _units(amount: float) -> int:
    return round(amount * RAY_UNITS)  # as Ray rounds a request


def check_trial_fits(args: argparse.Namespace, cfg: TrialConfig) -> None:
    """A trial asking for more CPUs or GPUs than an embedded cluster has would wait
    forever (a DDP trial: its worker group start times out and is retried, without end).
    Say so before starting. Compared as Ray does, in its fixed-point units (3 workers of
    2/3 CPU each need 3 x 6667 units: more than 2 CPUs). A cluster joined by address may
    grow (autoscaling): not checked."""
    if not _embedded_cluster(args):
        return
    import torch

    from sweeps.ray_private import ray_num_cpus  # what an embedded Ray counts

    t = cfg.train
    for kind, have, per_worker, field_name in (
            ("CPUs", ray_num_cpus(), t.cpus_per_worker, "cpus_per_worker"),
            ("GPUs", torch.cuda.device_count(), t.gpus_per_worker if t.use_gpu else 0.0,
             "gpus_per_worker")):
        if t.num_workers * _units(per_worker) <= have * RAY_UNITS:
            continue
        fits = math.floor(have * RAY_UNITS / t.num_workers) / RAY_UNITS
        flag = field_name.replace("_", "-").replace("gpus-per-worker", "gpus-per-trial")
        hint = f" (e.g. --{flag} {fits:g})" if fits else ""
        where = "the embedded Ray cluster on this machine" if kind == "CPUs" else "this machine"
        raise ConfigError(
            f"train.num_workers={t.num_workers} x train.{field_name}={per_worker:g} needs "
            f"{t.num_workers * _units(per_worker) / RAY_UNITS:g} {kind} per trial (Ray counts "
            f"1/{RAY_UNITS} units); {where} has {have}: allowed "
            f"num_workers x {field_name} <= {have}{hint}, or --address of a larger cluster")


def sweep_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The :class:`~sweeps.spec.Sweep` fields every script takes from the common flags."""
    return dict(name=name, max_concurrent=args.max_concurrent, seed=args.seed,
                tracking_uri=tracking_uri(args), storage_path=args.storage_path,
                address=args.address, auto_gpus=args.gpus_per_trial == "auto",
                max_failures=args.max_failures)


def tracking_uri(args: argparse.Namespace) -> str:
    uri = args.tracking_uri or default_tracking_uri()
    check_tracking_server(uri)
    return uri


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """An ``http(s)://`` tracking server must answer its /health now: MLflow's client
    would retry for minutes before a traceback."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an older server without /health)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tracking-uri {uri} does not answer ({exc}): start the MLflow "
                          "server, or leave the flag out for the local ./mlflow.db") from None


def print_summary(outcome: Any) -> None:
    from sweeps.runner import mlflow_ui_command

    best = outcome.best
    print("\n=== sweep finished ===")
    print(f"trials: {len(outcome.rows)}  "
          f"(finished {sum(r['status'] == 'FINISHED' for r in outcome.rows)}, "
          f"stopped early by ASHA {sum(r['status'] == 'KILLED' for r in outcome.rows)})")
    print(f"best trial {best['trial_id']} (MLflow run {best['mlflow_run_id']}):")
    for key, value in best.items():
        if key not in ("trial_id", "mlflow_run_id"):
            print(f"  {key:>20} = {value:.6g}" if isinstance(value, float)
                  else f"  {key:>20} = {value}")
    print(f"\nMLflow experiment {outcome.experiment!r}, parent run {outcome.parent_run_id}")
    print(f"See the results:  {mlflow_ui_command(outcome.tracking_uri)}")


def _shutdown_ray() -> None:
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def main_guard(main: Callable[[], int]) -> None:
    """Exit 2 with the message (no traceback) for bad input or missing data, 1 for a full
    disk, 130 for Ctrl-C (with the command that resumes); anything else propagates."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from sweeps.spec import SweepInterrupted

    try:
        sys.exit(main())
    except (ConfigError, DataNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SweepInterrupted as exc:
        _shutdown_ray()  # what Ray prints at exit (trials' unfetched errors) comes first
        kept = (f"run {exc.run_id} and its unfinished trials are KILLED in MLflow; finished "
                "trials are kept.")
        if exc.cause:  # stopped by a condition (a full disk), not by the user
            print(f"error: {exc.cause}. The sweep stopped: {kept} Free space on the full "
                  f"disk, then resume with:\n  {resume_command(exc.run_id)}", file=sys.stderr)
            sys.exit(1)
        print(f"\ninterrupted: {kept} Resume with:\n  {resume_command(exc.run_id)}",
              file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # before any sweep run existed, or after the last ended
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # a full disk outside a trial (its folders, the lock, MLflow)
        if exc.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on device writing {exc.filename or 'a file'}: free "
              "space there (or point --storage-path, the MLflow store or QSWEEP_CACHE "
              "elsewhere); any sweep run this started ended FAILED", file=sys.stderr)
        sys.exit(1)
