"""Figures a trial or a sweep writes (matplotlib, headless), and the one place matplotlib
is set up: every figure in the project takes its pyplot from :func:`pyplot`.

Example::

    plt = pyplot()
    fig, ax = plt.subplots()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["pyplot", "save_figure", "plot_weight_histograms", "plot_confusion"]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display; files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, ax: Any, path: Path) -> Path:
    """A light grid and small legend on ``ax``, then ``fig`` written to ``path`` and
    closed (the ending every scatter-with-front plot shares)."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def plot_weight_histograms(floats: dict[str, torch.Tensor], model: nn.Module,
                           path: Path) -> Path:
    """Per quantized layer: the float weights' histogram and the quantized values'."""
    import quant

    layers = list(quant.quantized_layers(model))
    plt = pyplot()
    cols = min(3, len(layers)) or 1
    rows = -(-len(layers) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, fqn in zip(axes.flat, layers, strict=False):
        w = floats[fqn].flatten().float().cpu()
        q = model.get_submodule(fqn).weight.detach().flatten().float().cpu()
        bins = torch.linspace(min(w.min(), q.min()).item(), max(w.max(), q.max()).item(),
                              81).numpy()
        ax.hist(w.numpy(), bins=bins, alpha=0.5, label="float")
        ax.hist(q.numpy(), bins=bins, alpha=0.5, label="quantized")
        ax.set_yscale("log")
        ax.set_title(f"{fqn} ({model.get_submodule(fqn).weight_format.name})", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_confusion(counts: torch.Tensor, path: Path, title: str) -> Path:
    plt = pyplot()
    k = counts.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * k, 0.8 + 0.45 * k))
    ax.imshow(counts.numpy(), cmap="Blues")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


