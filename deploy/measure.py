"""Timing and memory of a deployed model, comparable within one run.

- :func:`time_calls`: seconds per call, after warm-up calls (a compiled model compiles
  on its first call of a shape).
- :func:`percentile`: p50/p95 of those times.
- :class:`PeakRSS`: the process's peak resident memory above where it started, sampled
  every millisecond by a thread (CPU has no allocator statistics like CUDA's): the
  working memory of inference, not the weights, which are already loaded.
- :func:`relative_latency`: a model's median time over a fixed reference model's median,
  timed alternately in the same loop: on a shared machine the load slows both alike, so
  the ratio is comparable across trials where milliseconds are not.

Example::

    times = time_calls(deployed, images, repeats=50)
    p50, p95 = percentile(times, 50), percentile(times, 95)
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import torch
from torch import nn

__all__ = ["time_calls", "percentile", "PeakRSS", "relative_latency", "reference_model"]


def time_calls(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int,
               warmup: int = 2) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn(x)``, after ``warmup`` untimed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation, numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """``with PeakRSS() as peak: ...``; then ``peak.bytes``: the highest resident memory
    above the start seen while the block ran (Linux /proc, sampled every ms)."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def bytes(self) -> int:
        return self.peak - self.start


def reference_model(channels: int) -> nn.Module:
    """A fixed small conv net (seeded): the yardstick of :func:`relative_latency`."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def relative_latency(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     rounds: int = 20) -> tuple[float, float]:
    """(median seconds of ``fn(x)``, that over the reference model's median on the same
    input), the two timed alternately at the process's thread count (a trial's
    ``train.threads``; an onnxruntime session was built with the same count): the ratio
    cancels the machine's load and speed, the seconds do not."""
    reference = reference_model(x.shape[1])
    ours, theirs = [], []
    for _ in range(rounds):
        ours += time_calls(fn, x, 1, warmup=1 if not ours else 0)
        theirs += time_calls(reference, x, 1, warmup=1 if not theirs else 0)
    mine, ref = percentile(ours, 50), percentile(theirs, 50)
    return mine, mine / ref
