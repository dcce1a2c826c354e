"""One model in several formats, timed side by side: what bench/deploy.py prints and the
deployment study logs.

Per format: batch-1 latency (p50, p95 ms), throughput at the batch of ``x`` (images/s
from the median batch time), peak memory (MiB of RSS above the start while the format
is built and runs its first batch: compilation included, as a deployment pays it;
:class:`~deploy.measure.PeakRSS`; memory the allocator kept from an earlier format is
reused, not counted: a lower bound), bytes on disk, and top-1 agreement with FP32 eager
on ``x``. Rounds are interleaved (each round times every format once), so the
machine's noise hits all formats alike. Formats that cannot be lowered come back with
their error instead of a row.

Example::

    rows = speed_rows(model, images, ["fp32", "int8_pt2e"], out_dir=tmp)
    rows["int8_pt2e"]["img_per_s"] / rows["fp32"]["img_per_s"]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from deploy.formats import deploy, plain_copy
from deploy.measure import PeakRSS, percentile, time_calls
from deploy.pt2e import release_compiled

__all__ = ["speed_rows", "int8_ratios", "FP32_PATHS"]

FP32_PATHS = ("fp32", "fp32_compiled", "onnx_fp32")
BLOCK_S = 6.0  # a (format, round) block's time budget: fp16/bf16 can be ~20x slower


def _block(fn, x: torch.Tensor, repeats: int) -> list[float]:
    first = time_calls(fn, x, 1, warmup=0)
    more = max(0, min(repeats - 1, int(BLOCK_S / max(first[0], 1e-6))))
    return first + (time_calls(fn, x, more, warmup=0) if more else [])


def speed_rows(model: nn.Module, x: torch.Tensor, formats: Sequence[str], out_dir: Path,
               label: str = "model", rounds: int = 3, batch1_repeats: int = 20,
               batch_repeats: int = 3, calibration: list[torch.Tensor] | None = None
               ) -> dict[str, dict[str, Any]]:
    """Format -> its measured row, or {"error": ...} where it could not be deployed.
    ``calibration``: INT8 activation-range batches (default: ``x`` in 4 slices)."""
    if calibration is None:
        step = max(1, len(x) // 4)
        calibration = [x[i:i + step] for i in range(0, len(x), step)]
    deployed, rows, peak = {}, {}, {}
    for fmt in formats:
        try:
            with PeakRSS() as rss:
                d = deploy(model, fmt, x[:1], calibration, Path(out_dir) / label / fmt,
                           label=label)
                d(x)  # compiles the batch's shape before any timing
            d(x[:1])
            deployed[fmt], peak[fmt] = d, rss.bytes
        except Exception as exc:  # DeployError, or the first batch-64 call's own
            rows[fmt] = {"error": str(exc)}
    with torch.no_grad():
        want = plain_copy(model)(x).argmax(1)
    one = {f: [] for f in deployed}
    batch = {f: [] for f in deployed}
    for _ in range(rounds):
        for fmt, d in deployed.items():
            one[fmt] += _block(d, x[:1], batch1_repeats)
            batch[fmt] += _block(d, x, batch_repeats)
    for fmt, d in deployed.items():
        rows[fmt] = {"p50_ms": percentile(one[fmt], 50) * 1e3,
                     "p95_ms": percentile(one[fmt], 95) * 1e3,
                     "img_per_s": len(x) / statistics.median(batch[fmt]),
                     "peak_mib": peak[fmt] / 2**20, "bytes": d.nbytes,
                     "agree": (d(x).argmax(1) == want).float().mean().item()}
    release_compiled()
    return {fmt: rows[fmt] for fmt in formats if fmt in rows}


def int8_ratios(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """INT8 PT2E throughput over FP32 eager and over the fastest FP32 path measured (and
    onnxruntime INT8 over FP32); {} without the rows to divide."""
    ok = {f: r for f, r in rows.items() if "error" not in r}
    if "int8_pt2e" not in ok or "fp32" not in ok:
        return {}
    fastest = max((f for f in FP32_PATHS if f in ok), key=lambda f: ok[f]["img_per_s"])
    int8 = ok["int8_pt2e"]["img_per_s"]
    ratios = {"int8_over_eager": int8 / ok["fp32"]["img_per_s"],
              "int8_over_fastest_fp32": int8 / ok[fastest]["img_per_s"],
              "fastest_fp32": fastest}
    if "onnx_int8" in ok and "onnx_fp32" in ok:
        ratios["onnx_int8_over_onnx_fp32"] = (ok["onnx_int8"]["img_per_s"]
                                              / ok["onnx_fp32"]["img_per_s"])
    return ratios
