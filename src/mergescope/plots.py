"""Figures. Every function returns a matplotlib Figure; `mergescope.io.save_figure` writes it.

The Agg backend is used, so no display is needed.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    """A figure with a grid of axes (always a 2-D array of axes)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def training_curves(histories: dict[str, list[dict]], key: str = "loss"):
    """Per-epoch `key` of several training runs, one line each."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    for name, epochs in histories.items():
        ax.plot([e["epoch"] for e in epochs], [e[key] for e in epochs], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.legend()
    fig.tight_layout()
    return fig


def grouped_bars(groups: list[str], series: dict[str, tuple[list[float], list[float]]],
                 ylabel: str = "test accuracy", title: str = "", reference: dict[str, float] | None = None):
    """Grouped bar chart: one group of bars per entry of `groups` (e.g. merge methods), one bar
    per series (e.g. conditions) with error bars; `series[name] = (means, stds)`. Optional
    horizontal `reference` lines (name -> value)."""
    import numpy as np

    fig, axes = new_figure(width=max(6.0, 0.5 * len(groups) + 2), height=4.2)
    ax = axes[0, 0]
    x = np.arange(len(groups))
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, (means, stds)) in enumerate(series.items()):
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=2, label=name)
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey")
        ax.annotate(name, (len(groups) - 0.5, value), fontsize=7, color="grey", ha="right", va="bottom")
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
