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


def weight_histograms(values, scopes=None, layers=None, ncols: int = 3, bins: int = 80,
                      title: str = ""):
    """Per-layer weight histograms of two or more models with their fitted Gaussians (the WSA
    paper's Fig. 1 style): one panel per layer, one color per model.

    values: model name -> layer -> 1-D array/tensor of weights (`mergescope.scope.layer_values`);
    scopes: model name -> layer -> an object with ``mean`` and ``std`` (a `Scope`; default: the
    population mean and std of `values`); layers: the panels to draw (default: every layer of
    the first model)."""
    import math

    import numpy as np

    names = list(values)
    if not names:
        raise ValueError("weight_histograms needs at least one model")
    layers = list(layers) if layers is not None else list(values[names[0]])
    ncols = max(1, min(ncols, len(layers)))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=4.2, height=3.0)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, layer in enumerate(layers):
        ax = axes[i // ncols, i % ncols]
        arrays = {n: np.asarray(values[n][layer], dtype=np.float64).ravel() for n in names}
        lo = min(float(np.quantile(a, 0.0005)) for a in arrays.values())
        hi = max(float(np.quantile(a, 0.9995)) for a in arrays.values())
        edges = np.linspace(lo, hi, bins + 1)
        grid = np.linspace(lo, hi, 400)
        for j, n in enumerate(names):
            color = colors[j % len(colors)]
            s = scopes[n][layer] if scopes is not None else _Fit(arrays[n])
            ax.hist(arrays[n], bins=edges, density=True, histtype="stepfilled", alpha=0.3,
                    color=color)
            pdf = np.exp(-0.5 * ((grid - s.mean) / s.std) ** 2) / (s.std * math.sqrt(2 * math.pi))
            ax.plot(grid, pdf, color=color, lw=1.4, label=f"{n}: μ={s.mean:.2g} σ={s.std:.2g}")
        ax.set_title(layer, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
    for i in range(len(layers), nrows * ncols):
        axes[i // ncols, i % ncols].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class _Fit:
    """Mean and population std of an array, shaped like a `LayerScope` for the figures."""

    def __init__(self, a) -> None:
        self.mean, self.std = float(a.mean()), float(a.std()) or 1e-12
