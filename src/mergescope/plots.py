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
