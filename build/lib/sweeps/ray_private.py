"""Every private Ray attribute qsweep reads, in one place (Ray 2.60 has no public API for
them). ``tests/test_ray_private.py`` calls each against the installed Ray, so a Ray that
renames one fails that test by name instead of a sweep at run time.

- The callbacks of a restored Tuner: ``Tuner.restore`` takes no RunConfig, and restores
  the callbacks as pickled at the first start (their MLflow state as it was then);
  ``--resume`` must give it fresh ones.
- The trials a Tuner restored or a ResultGrid holds, with their Tune status: a
  ``Result`` carries no status, and an interrupted sweep is told apart by it.
- Whether an address names a running cluster, and where ``ray start`` leaves its address
  file (to tell a live cluster from a crashed one's leftover file).
- The autoscaler's preparation and validation of a cluster YAML, as ``ray up`` does it
  (``python -m sweeps.cluster_check``).
- The CPUs an embedded Ray counts on this node (cgroup limits included), to refuse a
  trial larger than the machine before Ray starts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tuner_callbacks", "set_tuner_callbacks", "restored_trials", "result_trials",
           "canonical_bootstrap_address", "ray_address_file", "ray_num_cpus",
           "prepare_cluster_config"]


def tuner_callbacks(tuner: Any) -> list[Any]:
    """The Tune callbacks a Tuner will run with."""
    return tuner._local_tuner._run_config.callbacks


def set_tuner_callbacks(tuner: Any, callbacks: list[Any]) -> None:
    """Replace a (restored) Tuner's callbacks."""
    tuner._local_tuner._run_config.callbacks = callbacks


def restored_trials(tuner: Any) -> list[Any]:
    """The trials of the state a Tuner was restored from ([] for a new Tuner)."""
    saved = tuner._local_tuner._experiment_analysis
    return list(saved.trials) if saved else []


def result_trials(results: Any) -> list[Any]:
    """The Tune trials (with ``status`` and ``trial_id``) behind a ResultGrid."""
    return results._experiment_analysis.trials


def canonical_bootstrap_address(address: str | None) -> str | None:
    """``host:port`` of a cluster ``address`` names (``auto``: the local ``ray start``
    one), or None where it names none."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


def ray_address_file() -> str:
    """Where ``ray start`` on this node writes its address (follows $RAY_TMPDIR)."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def ray_num_cpus() -> int:
    """The CPUs an embedded Ray would count on this node."""
    from ray._private.utils import get_num_cpus

    return get_num_cpus()


def prepare_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster launcher config filled in and validated as ``ray up`` does (raises
    jsonschema's ValidationError, or Click/Type/Value/Runtime errors)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared
