"""MLflow tracking of sweeps: the store (:mod:`.store`), the driver-side Tune callback
(:mod:`.callback`), how a trial is named and tagged (:mod:`.naming`), tables and plots,
and models loaded back from a run (:mod:`.models`).

Ray's MLflow integrations neither nest runs (ray issue 19978) nor send artifacts through
an ``http://`` tracking server from remote nodes (ray issue 36257): all writing happens
on the Ray driver, one writer per store.

Example::

    tracker = SweepTracker("sqlite:///mlflow.db", "baseline")
    parent = tracker.start_sweep("baseline-1", params={"num_samples": 8})
"""

from sweeps.tracking.callback import (
    MLflowSweepCallback,
    diverged_description,
    last_error_line,
    result_history,
    result_trial_id,
)
from sweeps.tracking.models import load_quantized_model
from sweeps.tracking.naming import (
    MAX_RUN_NAME,
    logged_params,
    quant_label,
    trial_metrics,
    trial_run_name,
    trial_tags,
)
from sweeps.tracking.plots import plot_curves, plot_sweep
from sweeps.tracking.store import (
    SweepTracker,
    adopt_moved_store,
    default_tracking_uri,
    existing_store,
)
from sweeps.tracking.tables import format_value, rows_to_csv, rows_to_markdown

__all__ = ["SweepTracker", "MLflowSweepCallback", "default_tracking_uri", "existing_store",
           "adopt_moved_store", "plot_curves", "plot_sweep", "trial_metrics",
           "load_quantized_model", "trial_run_name", "trial_tags", "quant_label",
           "logged_params", "MAX_RUN_NAME", "rows_to_csv", "rows_to_markdown",
           "format_value", "result_history", "result_trial_id", "last_error_line",
           "diverged_description"]
