"""Deployment as the last trial stage (``export.formats``, see
:class:`trainables.config.ExportSection`): the model the earlier stages left (pruned,
quantized, or the trained one) deployed on CPU in each format of ``deploy/formats.py``,
each evaluated on the test split (``deploy_acc_<format>``) and sized on disk
(``deploy_bytes_<format>``), optionally timed (``deploy_ms_<format>``,
``deploy_rel_<format>``).

Files (rank 0): ``export.json`` (per format: accuracy, bytes, files, latency, or the
error and the fallback), MLflow model folders (``onnx_fp32/``, ``onnx_int8/``,
``pytorch/``: MLflow's model *format* written as files, no tracking call: the trial's
artifacts carry them to its run), and ``model_int8.pt2``.

A diverged model (inf/NaN weights) or a format that cannot be lowered (an op the
exporter does not know) gives NaN metrics for that format and its reason in
``export.json``; the trial and the other formats go on.

Example::

    cfg = TrialConfig().with_overrides(["export.formats=[onnx_fp32,onnx_int8]"])
    run_trial(cfg, LocalSession())    # metrics deploy_acc_onnx_int8, deploy_bytes_...
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainables.config import TrialConfig
from trainables.stages.base import Stage, StageContext, diverged_reason, nonfinite_params

__all__ = ["ExportStage", "build_export_stage", "MLFLOW_FOLDERS"]

# Format -> the MLflow model folder it is written as (artifact path on the trial's run).
MLFLOW_FOLDERS = {"onnx_fp32": "onnx_fp32", "onnx_int8": "onnx_int8", "fp32": "pytorch"}


class _AsModule(nn.Module):
    """A deployed (CPU) model behind the nn.Module interface ctx.evaluate takes."""

    def __init__(self, deployed) -> None:
        super().__init__()
        self.deployed = deployed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The loop evaluates under the trial's autocast (amp_bf16...): a deployed format
        # runs in its own precision, not the training's.
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return self.deployed(x.detach().float().cpu()).to(x.device)


class ExportStage(Stage):
    name = "export"

    def __init__(self, cfg: TrialConfig) -> None:
        self.cfg = cfg

    def metric_names(self) -> frozenset[str]:
        names = set()
        for fmt in self.cfg.export.formats:
            names |= {f"deploy_acc_{fmt}", f"deploy_bytes_{fmt}"}
            if self.cfg.export.latency:
                names |= {f"deploy_ms_{fmt}", f"deploy_rel_{fmt}"}
        return frozenset(names)

    def finalize(self, ctx: StageContext) -> dict[str, float]:
        from deploy.pt2e import has_vnni, release_compiled

        model = ctx.result
        bad = nonfinite_params(model)
        report: dict[str, Any] = {"data_shape": list(ctx.data_shape),
                                  "int8_reduce_range": not has_vnni(), "formats": {}}
        metrics = {name: math.nan for name in self.metric_names()}
        calibration = [] if bad else _calibration(ctx, self.cfg.export.calibration_batches)
        if bad:
            report["not_exported"] = diverged_reason(bad)
        elif not calibration:
            report["not_exported"] = "no training batch to trace and calibrate with"
        else:
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    for fmt in self.cfg.export.formats:
                        report["formats"][fmt] = self._one(fmt, model, calibration, ctx,
                                                           metrics, Path(tmp) / fmt)
            finally:
                release_compiled()
        if ctx.is_chief:
            (ctx.out_dir / "export.json").write_text(json.dumps(report, indent=1))
        return metrics

    def _one(self, fmt: str, model: nn.Module, calibration: list[torch.Tensor],
             ctx: StageContext, metrics: dict[str, float], tmp: Path) -> dict[str, Any]:
        """Deploy, evaluate and keep one format; its error instead where any step fails
        (its metrics stay NaN). Every rank takes the same branch: a collective
        evaluation that one rank skipped would hang the others."""
        from deploy.formats import DeployError, deploy

        first = calibration[0][:1]
        try:
            deployed = deploy(model, fmt, first, calibration, tmp, label=self.cfg.model.name)
            error = None
        except DeployError as exc:
            deployed, error = None, str(exc)
        if not _all_ranks_ok(error is None, model):
            return {"error": error or "failed on another rank"}
        try:
            entry = self._measure(fmt, deployed, first, ctx, metrics)
            if ctx.is_chief:
                entry["files"] = self._keep(fmt, deployed, model, first, ctx.out_dir)
            return entry
        except Exception as exc:  # run time (onnxruntime, a kernel): this format only
            for name in self.metric_names():
                if name.endswith(f"_{fmt}"):
                    metrics[name] = math.nan
            return {"error": f"{self.cfg.model.name}: {fmt} failed while evaluated "
                             f"({type(exc).__name__}: {exc})"}

    def _measure(self, fmt: str, deployed, example: torch.Tensor, ctx: StageContext,
                 metrics: dict[str, float]) -> dict[str, Any]:
        from deploy.measure import relative_latency

        acc = ctx.evaluate(_AsModule(deployed), "test")["test_acc"]
        metrics[f"deploy_acc_{fmt}"] = acc
        metrics[f"deploy_bytes_{fmt}"] = deployed.nbytes
        entry: dict[str, Any] = {"test_acc": acc, "bytes": deployed.nbytes,
                                 "note": deployed.note}
        if self.cfg.export.latency:
            seconds, ratio = relative_latency(deployed, example)
            metrics[f"deploy_ms_{fmt}"] = seconds * 1e3
            metrics[f"deploy_rel_{fmt}"] = ratio
            entry.update(ms_batch1=seconds * 1e3, relative_latency=ratio)
        return entry

    def _keep(self, fmt: str, deployed, model: nn.Module, example: torch.Tensor,
              out_dir: Path) -> list[str]:
        """Copy what deploys ``fmt`` into the trial's files: an MLflow model folder
        where MLflow has a flavor for it, the INT8 program otherwise."""
        folder = MLFLOW_FOLDERS.get(fmt)
        if folder and self.cfg.export.mlflow_models:
            _save_mlflow_model(fmt, deployed, model, example, out_dir / folder)
            return [folder]
        if fmt == "int8_pt2e":
            shutil.copy(deployed.files[0], out_dir / "model_int8.pt2")
            return ["model_int8.pt2"]
        return []


def _calibration(ctx: StageContext, n: int) -> list[torch.Tensor]:
    """``n`` training batches (CPU, FP32), rank 0's on every rank under DDP: every rank
    then builds the same INT8 model (its own shard would give it its own ranges, and the
    summed evaluation would mix models)."""
    import torch.distributed as dist

    batches = [x.detach().float().cpu() for x in ctx.train_batches(n)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [batches]
        dist.broadcast_object_list(shared, src=0)
        batches = shared[0]
    return batches


def _all_ranks_ok(ok: bool, model: nn.Module) -> bool:
    """Whether every DDP rank's step succeeded (this rank's alone without DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    device = next(model.parameters()).device
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _save_mlflow_model(fmt: str, deployed, model: nn.Module, example: torch.Tensor,
                       path: Path) -> None:
    """An MLflow model folder (MLmodel, signature from the example's logits, the
    example itself) for an ONNX file or the FP32 torch model."""
    import mlflow
    from mlflow.models import infer_signature

    from deploy.formats import plain_copy

    x = example.numpy()
    signature = infer_signature(x, deployed(example).numpy())
    if path.exists():
        shutil.rmtree(path)
    if fmt.startswith("onnx_"):
        import onnx

        mlflow.onnx.save_model(onnx.load(str(deployed.files[0])), str(path),
                               signature=signature, input_example=x,
                               save_as_external_data=fmt == "onnx_fp32")
    else:
        # Pickled: MLflow's default here (pt2) exports at the example's batch size, 1,
        # and the loaded model refuses any other batch.
        mlflow.pytorch.save_model(plain_copy(model), str(path), signature=signature,
                                  input_example=x, serialization_format="pickle")


def build_export_stage(cfg: TrialConfig) -> Stage | None:
    return ExportStage(cfg) if cfg.export.formats else None
