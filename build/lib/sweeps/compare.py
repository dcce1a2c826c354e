"""Compare the cells of a study: the table, curves, learning-rate sensitivity and final
weight histograms that a study's MLflow run holds.

A *cell* is one point of the study's grid, named by its key (e.g. dataset, model,
optimizer): its search trials, the config picked from them, and that config re-run with
several seeds (histories and final weights per seed). Plots draw one panel per key
without its last part (dataset / model) and one series per last part (the optimizer).

Every seed that was asked for is counted: *ok*, *diverged* (its training loss was
non-finite at some epoch, or its final accuracy is at chance: a run that froze), or
*failed* (it raised). Means, stds and the 95% confidence interval (t-distribution over
seeds) are over the ok and diverged seeds: a diverged seed's accuracy is what that
config gave. :func:`paired_rows` compares matched cells seed by seed (the same seed
gives both the same initial weights and data order).

Example::

    cells = [CellResult(("mnist", "mlp", "eg"), search_rows, best_config, chance=0.1)]
    cells[0].add_seed_run(1, history, weights)
    print(rows_to_markdown(table_rows(cells, ("dataset", "model", "optimizer"))))
"""

from __future__ import annotations

import math
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from sweeps.outcome import at_chance, diverged
from trainables.plots import pyplot

__all__ = ["CellResult", "table_rows", "paired_rows", "mean_ci", "weight_vector",
           "weight_stats", "plot_comparison", "plot_cell_curves", "plot_sensitivity",
           "plot_weights"]

# A search trial "worked" when its final accuracy is within this of the cell's best.
WORKED_WITHIN = 0.01


@dataclass
class CellResult:
    key: tuple[str, ...]
    search_rows: list[dict[str, Any]]
    best_config: dict[str, Any]
    histories: list[list[dict[str, Any]]] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    picked_trial_id: str = ""  # the search trial whose config best_config is
    chance: float | None = None  # accuracy of guessing: 1 / classes
    asked: int = 0  # seed re-runs asked for (0: as many as reported)
    failed_seeds: list[int] = field(default_factory=list)

    @property
    def panel(self) -> tuple[str, ...]:
        return self.key[:-1]

    @property
    def series(self) -> str:
        return self.key[-1]

    def add_seed_run(self, seed: int, history: list[dict[str, Any]],
                     weights: torch.Tensor | None) -> None:
        self.seeds.append(seed)
        self.histories.append(history)
        if weights is not None:
            self.weights.append(weights)

    def add_failed_seed(self, seed: int) -> None:
        self.failed_seeds.append(seed)

    def finals(self, metric: str = "test_acc") -> list[float]:
        """The last reported value of ``metric`` of each seed run that has it."""
        return [h[-1][metric] for h in self.histories if h and metric in h[-1]]

    def finals_by_seed(self, metric: str = "test_acc") -> dict[int, float]:
        return {s: h[-1][metric] for s, h in zip(self.seeds, self.histories, strict=True)
                if h and metric in h[-1]}

    def seed_diverged(self, history: list[dict[str, Any]], metric: str = "test_acc") -> bool:
        """Non-finite training loss at some epoch, or the final ``metric`` at chance."""
        final = history[-1].get(metric) if history else None
        froze = (self.chance is not None and isinstance(final, (int, float))
                 and at_chance(final, self.chance))
        return diverged(history) or froze

    def seed_counts(self, metric: str = "test_acc") -> dict[str, int]:
        """Every seed asked for: ok, diverged, failed (and missing: asked, never reported)."""
        bad = sum(self.seed_diverged(h, metric) for h in self.histories)
        counts = {"seeds_asked": max(self.asked, len(self.histories) + len(self.failed_seeds)),
                  "seeds_ok": len(self.histories) - bad, "seeds_diverged": bad,
                  "seeds_failed": len(self.failed_seeds)}
        counts["seeds_missing"] = counts["seeds_asked"] - len(self.histories) - \
            len(self.failed_seeds)
        return counts


def weight_vector(model_state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All linear/conv weights (tensors of 2+ dims) of a state_dict, flattened (float64)."""
    parts = [t.detach().double().flatten() for t in model_state.values()
             if t.is_floating_point() and t.dim() >= 2]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def weight_stats(w: torch.Tensor) -> dict[str, float]:
    """Excess kurtosis (0 for a Gaussian; heavier tails are larger) and the spread of
    log2|w| (what a log-domain format has to cover)."""
    if w.numel() < 2:
        return {"kurtosis": math.nan, "log2_abs_std": math.nan}
    centred = w - w.mean()
    var = centred.pow(2).mean()
    nonzero = w[w != 0].abs()
    return {"kurtosis": (centred.pow(4).mean() / var.pow(2) - 3.0).item(),
            "log2_abs_std": nonzero.log2().std().item() if nonzero.numel() > 1 else math.nan}


def _mean_std(values: list[float]) -> tuple[float, float]:
    # NaN in (a diverged run's weights): NaN out. (statistics.stdev raises on NaN.)
    if not values or any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of its ``level`` confidence interval (Student's t over the
    values, e.g. seeds); NaN ends for fewer than two values, NaN everything on NaN input."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / \
        math.sqrt(len(values))
    return mean, mean - half, mean + half


def _interval(lo: float, hi: float) -> str:
    return f"{100 * lo:.2f}..{100 * hi:.2f}" if not math.isnan(lo) else ""


def _worked_range(rows: list[dict[str, Any]], metric: str) -> tuple[float, float]:
    scored = [r for r in rows if metric in r and not math.isnan(r[metric])]
    if not scored:
        return math.nan, math.nan
    best = max(r[metric] for r in scored)
    lrs = [r["optim.lr"] for r in scored if r[metric] >= best - WORKED_WITHIN]
    return min(lrs), max(lrs)


def _percent(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.2f} +- {100 * std:.2f}" if not math.isnan(mean) else ""


def table_rows(cells: list[CellResult], key_names: tuple[str, ...],
               metric: str = "test_acc", search_metric: str | None = None,
               extra_metrics: tuple[str, ...] = (),
               notes: Mapping[tuple[str, ...], Mapping[str, str]] | None = None
               ) -> list[dict[str, Any]]:
    """One row per cell: ``metric`` mean +- std over the seed re-runs (in percent in
    ``result``) and its 95% confidence interval (``ci95``), every seed asked for counted
    (ok, diverged, failed), each of ``extra_metrics`` that the runs reported (e.g.
    accuracy with rounded weights) likewise, or the text ``notes[cell.key][metric]`` where
    a value is known without measuring; the picked config, the learning rates that
    worked (by ``search_metric``, default ``metric``), and the final weights' tail
    statistics."""
    rows = []
    notes = notes or {}
    for cell in cells:
        search_metric = search_metric or metric
        finals = cell.finals(metric)
        mean, std = _mean_std(finals)
        _, ci_lo, ci_hi = mean_ci(finals)
        lo, hi = _worked_range(cell.search_rows, search_metric)
        stats = [weight_stats(w) for w in cell.weights]
        searched_lrs = [r["optim.lr"] for r in cell.search_rows if "optim.lr" in r]
        extra = {name: _percent(cell.finals(name)) for name in extra_metrics
                 if cell.finals(name)}
        extra.update({name: text for name, text in notes.get(cell.key, {}).items()
                      if name in extra_metrics})
        rows.append({
            **dict(zip(key_names, cell.key, strict=True)),
            f"{metric}_mean": mean, f"{metric}_std": std,
            f"{metric}_ci95_lo": ci_lo, f"{metric}_ci95_hi": ci_hi, "n_seeds": len(finals),
            **cell.seed_counts(metric),
            "result": _percent(finals), "ci95": _interval(ci_lo, ci_hi),
            **extra,
            "best_lr": cell.best_config.get("optim.lr", math.nan),
            "best_weight_decay": cell.best_config.get("optim.weight_decay", math.nan),
            "search_trials": len(cell.search_rows),
            f"search_best_{search_metric}": max((r.get(search_metric, math.nan)
                                                 for r in cell.search_rows),
                               default=math.nan),
            "lr_searched": (f"{min(searched_lrs):.3g}..{max(searched_lrs):.3g}"
                            if searched_lrs else ""),
            "lr_worked": f"{lo:.3g}..{hi:.3g}" if not math.isnan(lo) else "",
            "weight_kurtosis": _mean_std([s["kurtosis"] for s in stats])[0],
            "weight_log2_abs_std": _mean_std([s["log2_abs_std"] for s in stats])[0],
        })
    return rows


def paired_rows(cells: list[CellResult], pairs: tuple[tuple[str, str], ...],
                key_names: tuple[str, ...], metric: str = "test_acc") -> list[dict[str, Any]]:
    """Per panel and matched pair ``(a, b)`` of series (e.g. ("eg", "gd")): the seed-by-seed
    differences a - b of ``metric`` over the seeds both reported (a non-finite one is
    left out and counted), their mean, 95% confidence interval and how many seeds a
    won; ``verdict`` says which is better only where the interval excludes 0."""
    rows = []
    by_key = {c.key: c for c in cells}
    for panel in _panels(cells):
        for a, b in pairs:
            cell_a, cell_b = by_key.get((*panel, a)), by_key.get((*panel, b))
            if cell_a is None or cell_b is None:
                continue
            finals_a, finals_b = cell_a.finals_by_seed(metric), cell_b.finals_by_seed(metric)
            common = sorted(set(finals_a) & set(finals_b))
            every = [finals_a[s] - finals_b[s] for s in common]
            diffs = [d for d in every if math.isfinite(d)]  # a NaN accuracy: left out, counted
            mean, lo, hi = mean_ci(diffs)
            # Fewer than 3 pairs: t(1) = 12.7 makes any real interval huge, and a zero one
            # (two equal differences) would claim certainty it does not have.
            verdict = ("n < 3" if len(diffs) < 3 else f"{a} better" if lo > 0
                       else f"{b} better" if hi < 0 else "not resolved")
            rows.append({**dict(zip(key_names[:-1], panel, strict=True)), "pair": f"{a} - {b}",
                         "n_pairs": len(diffs), "non_finite_pairs": len(every) - len(diffs),
                         "first_wins": sum(d > 0 for d in diffs),
                         "mean_diff": mean, "ci95_lo": lo, "ci95_hi": hi,
                         "diff_points": f"{100 * mean:+.2f}" if not math.isnan(mean) else "",
                         "ci95": _interval(lo, hi),
                         "verdict": verdict})
    return rows


def _panels(cells: list[CellResult]) -> list[tuple[str, ...]]:
    return list(dict.fromkeys(c.panel for c in cells))


def _figure(rows: int, cols: int, width: float = 4.5, height: float = 3.4):
    plt = pyplot()

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return plt, fig, axes


def _save(plt: Any, fig: Any, path: str | Path, title: str) -> Path:
    # Wrapped to the figure's width: a one-panel figure cut a long title at both ends.
    chars = max(30, int(fig.get_figwidth() * 9))
    fig.suptitle(textwrap.fill(title, chars))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def plot_comparison(cells: list[CellResult], path: str | Path, metric: str = "test_acc"
                    ) -> Path:
    """One panel per key without its last part (dataset / model), one bar per series
    (optimizer): ``metric`` mean over the seeds with its 95% interval, each seed a dot."""
    panels = _panels(cells)
    plt, fig, axes = _figure(1, len(panels), width=max(4.5, 0.8 * len(cells) / len(panels)))
    for ax, panel in zip(axes[0], panels, strict=True):
        chosen = [c for c in cells if c.panel == panel]
        for x, cell in enumerate(chosen):
            finals = [v for v in cell.finals(metric) if math.isfinite(v)]
            mean, lo, hi = mean_ci(finals)
            if math.isnan(mean):
                continue
            err = [[mean - lo], [hi - mean]] if not math.isnan(lo) else None
            ax.bar(x, 100 * mean, color=f"C{x}", alpha=0.6,
                   yerr=None if err is None else [[100 * e[0]] for e in err], capsize=4)
            ax.scatter([x] * len(finals), [100 * v for v in finals], color="black", s=8,
                       zorder=3)
        ax.set_xticks(range(len(chosen)), [c.series for c in chosen], rotation=45,
                      ha="right", fontsize=8)
        values = [100 * v for c in chosen for v in c.finals(metric) if math.isfinite(v)]
        values += [100 * e for c in chosen for e in mean_ci(
            [v for v in c.finals(metric) if math.isfinite(v)])[1:] if math.isfinite(e)]
        if values:  # zoom on the spread and the intervals: accuracies differ in the last points
            ax.set_ylim(max(0.0, min(values) - 2), min(100.0, max(values) + 1))
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(" / ".join(panel))
        ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path, f"{metric}: mean and 95% interval over seeds (dots: seeds)")


def plot_cell_curves(cells: list[CellResult], path: str | Path) -> Path:
    """Train loss and test accuracy per epoch of each optimizer's best config: mean over
    seeds, the band is +- one std."""
    panels = _panels(cells)
    plt, fig, axes = _figure(len(panels), 2)
    for row, panel in enumerate(panels):
        for cell in (c for c in cells if c.panel == panel and c.histories):
            epochs = [m["epoch"] for m in cell.histories[0]]
            for ax, key in zip(axes[row], ("train_loss", "test_acc"), strict=True):
                runs = torch.tensor([[float(m[key]) for m in h] for h in cell.histories
                                     if len(h) == len(epochs)], dtype=torch.float64)
                # Diverged seeds (NaN loss) are counted in the label, not averaged in.
                finite = runs[torch.isfinite(runs).all(1)]
                label = cell.series
                if len(finite) < len(runs):
                    label += f" ({len(runs) - len(finite)}/{len(runs)} diverged)"
                if not len(finite):
                    continue
                mean, std = finite.mean(0).tolist(), finite.std(0, unbiased=False).tolist()
                line = ax.plot(epochs, mean, marker="o", label=label)[0]
                ax.fill_between(epochs, [m - s for m, s in zip(mean, std, strict=True)],
                                [m + s for m, s in zip(mean, std, strict=True)],
                                color=line.get_color(), alpha=0.2)
        for ax, key in zip(axes[row], ("train loss", "test accuracy"), strict=True):
            ax.set_title(f"{' / '.join(panel)}: {key}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        if axes[row][0].lines:
            axes[row][0].set_yscale("log")
    return _save(plt, fig, path, "best config of each optimizer (mean +- std over seeds)")


def plot_sensitivity(cells: list[CellResult], path: str | Path,
                     metric: str = "test_acc") -> Path:
    """Final accuracy of every search trial against its learning rate, per optimizer;
    hollow markers are trials the scheduler stopped early."""
    panels = _panels(cells)
    plt, fig, axes = _figure(1, len(panels), width=5.5)
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, cell in enumerate(c for c in cells if c.panel == panel):
            colour = f"C{i}"
            for finished in (True, False):
                chosen = [r for r in cell.search_rows if metric in r and
                          (r.get("status") == "FINISHED") == finished]
                ax.scatter([r["optim.lr"] for r in chosen], [r[metric] for r in chosen],
                           edgecolors=colour, facecolors=colour if finished else "none",
                           label=cell.series if finished else None, s=25)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final {metric}")
        ax.set_title(" / ".join(panel))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, "learning-rate sensitivity (hollow: did not finish)")


def plot_weights(cells: list[CellResult], path: str | Path) -> Path:
    """Histograms of log2|w| of the final weights (all seeds) per optimizer: the range a
    logarithmic format must cover; the legend gives the excess kurtosis of w."""
    panels = _panels(cells)
    plt, fig, axes = _figure(1, len(panels), width=5.5)
    for ax, panel in zip(axes[0], panels, strict=True):
        for cell in (c for c in cells if c.panel == panel and c.weights):
            w = torch.cat(cell.weights)
            w = w[torch.isfinite(w) & (w != 0)]  # a diverged run's inf/NaN has no log
            if not w.numel():
                continue
            kurtosis = weight_stats(w)["kurtosis"]
            ax.hist(w.abs().log2().clamp(-24, 8).numpy(), bins=80, histtype="step",
                    density=True, label=f"{cell.series} (kurtosis {kurtosis:.1f})")
        ax.set_xlabel("log2 |w|")
        ax.set_ylabel("density")
        ax.set_title(" / ".join(panel))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, "final weights of each optimizer's best config")
