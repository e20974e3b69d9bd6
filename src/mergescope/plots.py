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


def mc_scope_histograms(pairs, title: str = "", bins: int = 60):
    """Per-layer weight histograms of model pairs under several treatments, with Gaussian fits
    (the WSA paper's Fig. 1 view).

    `pairs`: treatment -> run label (e.g. "A", "B") -> layer -> weight tensor. One row per
    treatment, one column per layer; each panel overlays the runs' histograms (density) and the
    N(μ, σ²) of each run as a line, so a scope mismatch shows as different widths."""
    import numpy as np

    rows = list(pairs)
    layers = list(next(iter(next(iter(pairs.values())).values())))
    fig, axes = new_figure(ncols=len(layers), nrows=len(rows), width=3.4, height=2.6)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, treatment in enumerate(rows):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            vals = {run: w[layer].detach().cpu().double().reshape(-1).numpy()
                    for run, w in pairs[treatment].items()}
            lim = max(float(np.quantile(np.abs(v), 0.999)) for v in vals.values()) or 1.0
            edges = np.linspace(-lim, lim, bins + 1)
            grid = np.linspace(-lim, lim, 200)
            for k, (run, v) in enumerate(vals.items()):
                c = colors[k % len(colors)]
                mu, sd = float(v.mean()), float(v.std())
                ax.hist(v, bins=edges, density=True, alpha=0.35, color=c,
                        label=f"{run}: σ={sd:.3g}")
                if sd > 0:
                    ax.plot(grid, np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)),
                            color=c, lw=1)
            ax.set_title(f"{treatment}\n{layer}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
