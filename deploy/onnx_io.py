"""ONNX: FP32 export (torch's dynamo exporter), INT8 QDQ by onnxruntime's static
quantization, and onnxruntime sessions that run them.

- ``export_onnx``: ``torch.onnx.export(..., dynamo=True)`` with a symbolic batch size.
  The exporter writes the weights to an external-data file beside the ``.onnx`` by
  default: :func:`onnx_bytes` counts every file the model needs, not the graph alone.
- ``quantize_onnx_int8``: ``quant_pre_process`` (shape inference, graph optimization),
  then ``quantize_static`` in the QDQ format: per-channel INT8 weights, UINT8 activations
  with ranges from calibration batches (min/max), ``reduce_range`` where the CPU lacks
  VNNI (in onnxruntime: 7-bit *weights*, its way around u8 x s8 saturation; PT2E
  narrows the activations instead: the two INT8 paths differ there). Weights are
  stored as INT8 initializers, so the file is ~4x smaller than FP32 (one file: no
  external data under 2 GB).

Example::

    fp32 = export_onnx(model, example, out / "model.onnx")
    int8 = quantize_onnx_int8(fp32, calibration_batches, out / "model_int8.onnx")
    logits = OnnxRunner(int8)(images)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

__all__ = ["export_onnx", "quantize_onnx_int8", "onnx_bytes", "onnx_files", "OnnxRunner",
           "require_onnx"]

INPUT = "images"


def require_onnx() -> None:
    """Raise ImportError naming the missing package (onnx, onnxscript, onnxruntime)."""
    import importlib.util

    missing = [p for p in ("onnx", "onnxscript", "onnxruntime")
               if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install "
                          f"{' '.join(missing)} (or pick formats without onnx_)")


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The eval model as FP32 ONNX at ``path`` (plus ``path.data``, its weights), input
    ``images`` with any batch size, output ``logits``."""
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    sample = example.expand(max(2, example.shape[0]), *example.shape[1:]).contiguous()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines, per model
        torch.onnx.export(model.eval(), (sample,), str(path), dynamo=True,
                          input_names=[INPUT], output_names=["logits"],
                          dynamic_shapes=({0: batch},), external_data=True)
    return path


def onnx_files(path: Path) -> list[Path]:
    """The ``.onnx`` file and every external-data file it references."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in _all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sorted(files)


def onnx_bytes(path: Path) -> int:
    """Bytes on disk of the model: the graph and its external data."""
    return sum(f.stat().st_size for f in onnx_files(path))


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


class _Batches:
    """onnxruntime's CalibrationDataReader over torch batches."""

    def __init__(self, batches: Iterable[torch.Tensor]) -> None:
        self.items = iter([{INPUT: b.detach().cpu().numpy().astype(np.float32)}
                           for b in batches])

    def get_next(self):
        return next(self.items, None)


def quantize_onnx_int8(fp32: Path, calibration: Iterable[torch.Tensor], path: Path,
                       reduce_range: bool | None = None) -> Path:
    """INT8 QDQ ONNX of the FP32 model ``fp32``, activation ranges from ``calibration``."""
    require_onnx()
    from deploy.pt2e import has_vnni

    if reduce_range is None:
        reduce_range = not has_vnni()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Batches, CalibrationDataReader):
        pass

    reader = Reader(calibration)
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        import onnx

        # One self-contained file first: quant_pre_process's temporary copies of a model
        # with external data lose track of the data file (onnxruntime 1.32).
        single = Path(tmp) / "fp32.onnx"
        onnx.save(onnx.load(str(fp32)), str(single))
        quant_pre_process(str(single), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return path


class OnnxRunner:
    """An onnxruntime CPU session called like a model: torch images in, torch logits out.
    ``threads``: intra-op threads (0: onnxruntime's default, one per core)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        require_onnx()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # no per-session warnings in trial logs
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy().astype(np.float32, copy=False)
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])
