"""The Ray a sweep runs on: joining a running cluster or starting an embedded one, and
sharing a cluster's GPUs among concurrent trials.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

from sweeps.ray_private import canonical_bootstrap_address, ray_address_file
from sweeps.spec import Sweep
from sweeps.tracking import SweepTracker
from trainables.config import TrialConfig

__all__ = ["init_ray", "gpu_share", "autoscaler_gpus", "with_cluster_gpus",
           "ray_start_cluster_answers"]


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs need no token
    # Short trials checkpoint every few seconds, and Tune then warns at every snapshot of
    # the experiment state; the snapshots are cheap here (small state, local disk).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # What --resume restores after a killed driver: Tune's default saves it every 10 s or
    # more, so trials that ended in those seconds would run again (from their last
    # checkpoint; an ASHA-stopped one would train on). Every second costs milliseconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # With no address, ray.init joins a cluster already running on this node (as under
    # `ray submit`) and otherwise starts an embedded one; but it would also try, and fail,
    # to join a dead one whose address file a crash left behind.
    if address is None and not os.environ.get("RAY_ADDRESS") and \
            not ray_start_cluster_answers():
        address = "local"
    ray.init(address=address, configure_logging=True,
             logging_level="WARNING", log_to_driver=True, **_own_cluster_api(address))


def gpu_share(total_gpus: float, max_concurrent: int, num_workers: int) -> float:
    """GPUs per worker when ``max_concurrent`` trials of ``num_workers`` workers share
    ``total_gpus``: a whole GPU each where there are enough (DDP wants whole ones), else
    the largest 1/k that fits; 0 without GPUs."""
    if total_gpus < 1:
        return 0.0
    if num_workers > 1:  # NCCL refuses two ranks on one GPU: whole GPUs, else CPU (gloo)
        return 1.0 if total_gpus >= num_workers else 0.0
    share = total_gpus / (max_concurrent * num_workers)
    return 1.0 if share >= 1 else 1.0 / math.ceil(1 / share)


def autoscaler_gpus(config_path: Path) -> float:
    """The GPUs an autoscaling cluster can add: from the launcher's config (the head keeps
    it as ~/ray_bootstrap_config.yaml), each node type's declared GPUs x its max_workers,
    at most the cluster's max_workers nodes of the largest. 0 without such a file."""
    import yaml

    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 0.0
    types = list((config.get("available_node_types") or {}).values())
    per_node = [float((t.get("resources") or {}).get("GPU", 0)) for t in types]
    total = sum(g * int(t.get("max_workers", 0)) for g, t in zip(per_node, types, strict=True))
    cap = int(config.get("max_workers", 0)) * max(per_node, default=0.0)
    return min(total, cap) if cap else total


def with_cluster_gpus(sweep: Sweep, base: TrialConfig, tracker: SweepTracker,
                       parent: str) -> TrialConfig:
    import ray

    if not sweep.auto_gpus or base.train.use_gpu:
        return base
    # An autoscaling cluster (ray submit cluster/gpu.yaml) may have no GPU node yet.
    total = ray.cluster_resources().get("GPU", 0.0) or \
        autoscaler_gpus(Path.home() / "ray_bootstrap_config.yaml")
    share = gpu_share(total, sweep.max_concurrent, base.train.num_workers)
    tracker.log_params(parent, {"sweep.cluster_gpus": total, "sweep.gpus_per_worker": share})
    if share == 0:
        return base
    print(f"--gpus-per-trial auto: {share:g} GPU per worker ({total:g} GPUs in the cluster, "
          f"{sweep.max_concurrent} trials at once)", flush=True)
    return base.replace({"train.use_gpu": True, "train.gpus_per_worker": share})


def _own_cluster_api(address: str | None) -> dict[str, Any]:
    """An embedded cluster's dashboard port, told to every process it starts: Ray's state
    API (Train V2's PlacementGroupCleaner uses it) otherwise looks for "the" local Ray
    and, with a second sweep's embedded cluster on this machine, fails with "Found
    multiple active Ray instances". Nothing where ray.init joins a running cluster."""
    if address and "://" in address or os.environ.get("RAY_ADDRESS") or \
            canonical_bootstrap_address(address) is not None:
        return {}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Through the job's runtime env (its actors, the cleaner among them), not os.environ:
    # nothing outlives this cluster.
    return {"dashboard_port": port, "runtime_env": {"env_vars": {
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}


def ray_start_cluster_answers() -> bool:
    """A `ray start` cluster on this node that answers (the file it leaves behind stays
    after a crash or a killed node: its address must be checked, not just the file).
    Where Ray keeps the file: /tmp/ray, or $RAY_TMPDIR/ray (or $TMPDIR/ray) when set."""
    path = Path(ray_address_file())
    try:
        host, port = path.read_text().strip().rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        return False
