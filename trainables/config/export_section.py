"""The ``export`` section: deployable versions of the trained model (``deploy/``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trainables.config.base import Section, fail

__all__ = ["ExportSection", "EXPORT_FORMATS"]

# deploy.formats.FORMATS, repeated so that reading a config does not import torch's
# exporters (tests/test_deploy.py checks the two agree).
EXPORT_FORMATS = ("fp32", "fp32_compiled", "fp16", "bf16", "int8_pt2e", "int8_pt2e_eager",
                  "onnx_fp32", "onnx_int8")


@dataclass(frozen=True)
class ExportSection(Section):
    """After the other stages (prune, quant, ...), the model they left deployed in each of
    ``formats`` (see ``deploy/formats.py``) on CPU: each format's test accuracy
    (``deploy_acc_<format>``) and bytes on disk (``deploy_bytes_<format>``, ONNX external
    data included), files in ``export.json``. ``mlflow_models``: the ONNX formats and the
    FP32 torch model are written as MLflow models (signature, input example) in the
    trial's artifacts (``onnx_int8/``, ``pytorch/``...), loadable with
    ``mlflow.pyfunc.load_model("runs:/<run id>/onnx_int8")``; the INT8 PT2E program as
    ``model_int8.pt2`` (``torch.export.load``). ``latency``: each format's batch-1
    latency at the trial's threads (``deploy_ms_<format>``, median) and that over a fixed
    reference net's timed alternately with it (``deploy_rel_<format>``: comparable across
    trials on a shared machine). ``calibration_batches``: training batches that set the
    INT8 activation ranges."""

    section: ClassVar[str] = "export"
    formats: tuple[str, ...] = ()
    mlflow_models: bool = True
    latency: bool = False
    calibration_batches: int = 8

    def _validate(self) -> None:
        for i, name in enumerate(self.formats):
            if name not in EXPORT_FORMATS:
                fail(f"export.formats[{i}]", name, "one of " + ", ".join(EXPORT_FORMATS))
        if len(set(self.formats)) != len(self.formats):
            fail("export.formats", list(self.formats), "each format once")
        self._range("calibration_batches", 1, 10_000)
        onnx = [f for f in self.formats if f.startswith("onnx_")]
        if onnx:
            import importlib.util

            missing = [p for p in ("onnx", "onnxscript", "onnxruntime")
                       if importlib.util.find_spec(p) is None]
            if missing:
                fail("export.formats", list(self.formats),
                     f"formats without {', '.join(onnx)} here: {', '.join(missing)} "
                     f"not installed (pip install {' '.join(missing)})")
