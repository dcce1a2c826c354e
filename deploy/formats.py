"""Deployment formats: one trained model -> a callable that runs it in that format, the
files it is deployed as, and their bytes on disk.

=================  ==========================================================  ==========
format             what runs                                                   on disk
=================  ==========================================================  ==========
fp32               eager PyTorch, FP32                                          .pt (state_dict)
fp32_compiled      ``torch.compile`` + inductor freezing, FP32                  .pt
fp16, bf16         eager PyTorch in that dtype (inputs cast, logits FP32)       .pt
int8_pt2e          PT2E INT8, compiled with freezing: INT8 oneDNN kernels       .pt2 (torch.export)
int8_pt2e_eager    the same INT8 program eager: quantize -> dequantize -> FP32  .pt2
                   ops, i.e. its own fake-quant twin (no speed, the reference)
onnx_fp32          onnxruntime, FP32 ONNX (graph + external weights file)      .onnx + .data
onnx_int8          onnxruntime, INT8 QDQ ONNX (static, per-channel)            .onnx
=================  ==========================================================  ==========

Example::

    deployed = deploy(model, "onnx_int8", example, calibration_batches, out_dir)
    deployed.nbytes, deployed.files, deployed(images)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["FORMATS", "FORMAT_NOTES", "Deployed", "DeployError", "deploy", "check_formats",
           "plain_copy", "FALLBACK"]

FORMATS = ("fp32", "fp32_compiled", "fp16", "bf16", "int8_pt2e", "int8_pt2e_eager",
           "onnx_fp32", "onnx_int8")
FALLBACK = "fp32_compiled"  # what to deploy instead where an INT8 or ONNX lowering fails
FORMAT_NOTES = {
    "fp16": "CPU: eager half precision, emulated on AVX2 (slow); for GPUs",
    "bf16": "CPU: eager bfloat16, no AVX512-BF16/AMX here (slow); for GPUs",
    "int8_pt2e_eager": "reference: INT8 grid simulated in FP32 (not a speed path)",
}


class DeployError(RuntimeError):
    """A model that cannot be deployed in a format: the message names the model, the
    format, the step that failed and the fallback."""


@dataclass
class Deployed:
    """A model in one format: call it on FP32 images (NCHW) for FP32 logits."""

    format: str
    run: Callable[[torch.Tensor], torch.Tensor]
    files: list[Path] = field(default_factory=list)
    note: str = ""

    @property
    def nbytes(self) -> int:
        return sum(Path(f).stat().st_size for f in self.files)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.run(x)
            return out.float() if isinstance(out, torch.Tensor) else out


def check_formats(formats: Sequence[str]) -> None:
    """Raise ValueError naming an unknown format and the allowed ones."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown deployment format {', '.join(map(repr, unknown))}: "
                         f"allowed {', '.join(FORMATS)}")


def plain_copy(model: nn.Module) -> nn.Module:
    """An eval copy of a trained (or quantized) model without the project's training
    hooks: fake-quantizers removed (a converted model keeps its rounded weights), input
    quantizers removed (INT8 deployment calibrates its own activation ranges)."""
    from quant.transforms import strip_qat_

    return strip_qat_(copy.deepcopy(model)).cpu().eval()


def _nonfinite(model: nn.Module) -> list[str]:
    return [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def deploy(model: nn.Module, fmt: str, example: torch.Tensor,
           calibration: Iterable[torch.Tensor] | None, out_dir: Path,
           label: str = "model") -> Deployed:
    """``model`` (not changed) deployed as ``fmt``, its files in ``out_dir``.
    ``calibration``: input batches for the INT8 activation ranges (int8 formats).
    Raises DeployError (a diverged model, a lowering that failed, a missing package)."""
    check_formats([fmt])
    bad = _nonfinite(model)
    if bad:
        raise DeployError(f"{label}: cannot deploy as {fmt}: its weights hold inf/NaN (a "
                          f"diverged trial): {', '.join(bad[:5])}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = plain_copy(model)
    needs_data = fmt in ("int8_pt2e", "int8_pt2e_eager", "onnx_int8")
    batches = list(calibration or [])
    if needs_data and not batches:
        raise DeployError(f"{label}: {fmt} needs calibration batches (none given)")
    try:
        deployed = _BUILD[fmt](model, example, batches, out_dir)
        # One call here: a compiled format lowers on its first call, and a model whose
        # output is not one tensor fails on it; both belong to this error, not to the
        # caller's first evaluation.
        out = deployed(example)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise TypeError(f"the model's output is not one tensor of logits (batch x "
                            f"classes): got {type(out).__name__}")
        return deployed
    except ImportError as exc:
        raise DeployError(f"{label}: cannot deploy as {fmt}: {exc}") from exc
    except DeployError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise DeployError(f"{label}: {fmt} failed ({type(exc).__name__}: "
                          f"{text[0] if text else ''}); suggested fallback: {FALLBACK}"
                          ) from exc


def _state_file(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def _fp32(model, example, batches, out):
    return Deployed("fp32", model, [_state_file(model, out / "model_fp32.pt")])


def _fp32_compiled(model, example, batches, out):
    from deploy.pt2e import compile_frozen

    return Deployed("fp32_compiled", compile_frozen(model),
                    [_state_file(model, out / "model_fp32.pt")])


def _half(dtype: torch.dtype, name: str):
    def build(model, example, batches, out):
        model = model.to(dtype)
        return Deployed(name, lambda x: model(x.to(dtype)),
                        [_state_file(model, out / f"model_{name}.pt")], FORMAT_NOTES[name])

    return build


def _pt2e(compiled: bool):
    def build(model, example, batches, out):
        from deploy.pt2e import compile_frozen, export_batch_dynamic, quantize_int8

        reference = quantize_int8(model, batches, example)
        path = out / "model_int8.pt2"
        torch.export.save(export_batch_dynamic(reference, example), str(path))
        if compiled:
            return Deployed("int8_pt2e", compile_frozen(reference), [path])
        return Deployed("int8_pt2e_eager", reference, [path], FORMAT_NOTES["int8_pt2e_eager"])

    return build


def _onnx_fp32(model, example, batches, out):
    from deploy.onnx_io import OnnxRunner, export_onnx, onnx_files

    path = export_onnx(model, example, out / "model.onnx")
    return Deployed("onnx_fp32", OnnxRunner(path, threads=torch.get_num_threads()),
                    onnx_files(path))


def _onnx_int8(model, example, batches, out):
    from deploy.onnx_io import OnnxRunner, export_onnx, onnx_files, quantize_onnx_int8

    fp32 = export_onnx(model, example, out / "model_for_int8.onnx")  # this model's, fresh
    path = quantize_onnx_int8(fp32, batches, out / "model_int8.onnx")
    return Deployed("onnx_int8", OnnxRunner(path, threads=torch.get_num_threads()),
                    onnx_files(path))


_BUILD = {"fp32": _fp32, "fp32_compiled": _fp32_compiled,
          "fp16": _half(torch.float16, "fp16"), "bf16": _half(torch.bfloat16, "bf16"),
          "int8_pt2e": _pt2e(True), "int8_pt2e_eager": _pt2e(False),
          "onnx_fp32": _onnx_fp32, "onnx_int8": _onnx_int8}
