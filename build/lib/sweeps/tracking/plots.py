"""A sweep's figures: a trial's curves, a sweep's metric against each searched key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from sweeps.tracking.tables import is_number
from trainables.plots import pyplot

__all__ = ["plot_curves", "plot_sweep"]


def plot_curves(history: Iterable[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Loss and accuracy per epoch (train, test, val when present) as a PNG."""
    plt = pyplot()

    rows = list(history)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, kind in zip(axes, ("loss", "acc"), strict=False):
        for split in ("train", "val", "test"):
            key = f"{split}_{kind}"
            if rows and key in rows[0]:
                ax.plot(epochs, [r[key] for r in rows], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_sweep(rows: list[Mapping[str, Any]], searched: list[str], metric: str,
               path: str | Path, title: str) -> Path | None:
    """The final ``metric`` of every trial against each numeric searched parameter (log
    axis where the values span more than 20x); colours tell finished from stopped trials."""
    plt = pyplot()

    keys = [k for k in searched if all(is_number(r.get(k)) for r in rows)]
    if not keys or not rows:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    colours = {"FINISHED": "tab:green", "KILLED": "tab:orange", "FAILED": "tab:red"}
    for ax, key in zip(axes[0], keys, strict=True):
        for status, colour in colours.items():
            chosen = [r for r in rows if r.get("status") == status and metric in r]
            ax.scatter([r[key] for r in chosen], [r[metric] for r in chosen], c=colour,
                       label=f"{status} ({len(chosen)})")
        values = [r[key] for r in rows]
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
