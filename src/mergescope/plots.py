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


def interpolation_curves(curves, title: str = ""):
    """Loss and accuracy against α for several `Curve`s: train dashed, test solid."""
    fig, axes = new_figure(ncols=2)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, curve) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for split, m in curve.metrics.items():
            style = "--" if split == "train" else "-"
            lbl = f"{name} ({split})"
            axes[0, 0].plot(curve.t, m["loss"], style, color=color, label=lbl)
            axes[0, 1].plot(curve.t, m["accuracy"], style, color=color, label=lbl)
    xlabel = "α" if all(c.num_models == 2 for c in curves.values()) else "position on path"
    for ax, ylabel in zip(axes[0], ("loss", "accuracy"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def barrier_vs_width(series, ylabel: str = "loss barrier", title: str = ""):
    """Barrier against model width, one line per series ``name -> (widths, means, stds)``;
    series whose name mentions a fix (REPAIR, BN reset) are dashed. Width on a log2 axis."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bases: list[str] = []
    for name, (widths, means, stds) in series.items():
        base = name.split(" + ")[0]
        if base not in bases:
            bases.append(base)
        color = colors[bases.index(base) % len(colors)]
        style = "--" if " + " in name else "-"
        ax.errorbar(widths, means, yerr=stds if any(s > 0 for s in stds) else None, fmt=style,
                    marker="o", color=color, label=name, capsize=3)
    ax.set_xscale("log", base=2)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("width (hidden units per layer)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
