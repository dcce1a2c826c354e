"""Models back from MLflow: a quantized trial's packed model, rebuilt without the
training code's config objects at hand."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sweeps.tracking.store import default_tracking_uri

__all__ = ["load_quantized_model"]


def load_quantized_model(run_id: str, tracking_uri: str | None = None) -> tuple[Any, Any]:
    """``(model, TrialConfig)`` of a quantized trial's MLflow run: the architecture rebuilt
    from its config.yaml and shapes (quant.json), the weights from its packed model.qsw,
    so the model reproduces the accuracy the trial evaluated (eval mode)."""
    import json

    import yaml
    from mlflow.tracking import MlflowClient

    from trainables.config import TrialConfig
    from trainables.models import model_for_packed

    client = MlflowClient(tracking_uri or default_tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = {name: client.download_artifacts(run_id, name, tmp)
                     for name in ("config.yaml", "quant.json", "model.qsw")}
        except Exception as exc:  # MLflow raises several kinds for a missing artifact
            raise ValueError(f"run {run_id} has no packed model (config.yaml, quant.json, "
                             f"model.qsw): was it a quant.mode=ptq|qat trial? ({exc})") from None
        cfg = TrialConfig.from_stored(yaml.safe_load(Path(paths["config.yaml"]).read_text()))
        channels, size, classes = json.loads(Path(paths["quant.json"]).read_text())[
            "data_shape"]
        model = model_for_packed(cfg, (channels, size, classes), paths["model.qsw"])
    return model.eval(), cfg
