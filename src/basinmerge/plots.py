"""Figures. Every function returns a matplotlib Figure; `basinmerge.io.save_figure` writes it.

The Agg backend is used, so no display is needed.
"""

from __future__ import annotations

from typing import Any


def _pyplot():
    """matplotlib.pyplot with the Agg backend, imported on first use (importing matplotlib costs
    about 0.3 s, which commands that draw nothing should not pay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


class _LazyPyplot:
    """Stands for `matplotlib.pyplot` in this module; imports it on the first attribute read."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_pyplot(), name)


plt: Any = _LazyPyplot()


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    """A figure with a grid of axes (always a 2-D array of axes)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


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

    values: model name -> layer -> 1-D array/tensor of weights (`basinmerge.scope.layer_values`);
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


# --------------------------------------------------------------------------- federated learning


def partition_heatmap(histogram, class_names=None, title: str = "examples per client and class"):
    """A (clients × classes) count matrix as a heatmap (from `basinmerge.fl.class_histogram`)."""
    import numpy as np

    h = np.asarray(histogram, dtype=float)
    n_clients, n_classes = h.shape
    fig, axes = new_figure(width=max(4.0, 0.45 * n_classes + 2.0),
                           height=max(3.0, 0.22 * n_clients + 1.2))
    ax = axes[0, 0]
    im = ax.imshow(h, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(n_classes))
    if class_names is not None:
        ax.set_xticklabels([str(c) for c in class_names], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(0, n_clients, max(1, n_clients // 10)))
    fig.colorbar(im, ax=ax, label="examples")
    ax.set_title(title)
    fig.tight_layout()
    return fig


class _Fit:
    """Mean and population std of an array, shaped like a `LayerScope` for the figures."""

    def __init__(self, a) -> None:
        self.mean, self.std = float(a.mean()), float(a.std()) or 1e-12


def fl_round_curves(panels, ylabel: str, logy: bool = False, title: str = ""):
    """Per-round curves of federated runs. `panels` maps a panel title to {name: runs}, each
    run a list of per-round values (round 0 first); the line is the mean over runs and the
    band ± one standard deviation (min..max with `logy`). NaN/None values (e.g. round 0 of a
    divergence) are skipped."""
    import warnings

    import numpy as np

    fig, axes = new_figure(ncols=len(panels))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (ptitle, curves) in zip(axes[0], panels.items(), strict=True):
        for i, (name, runs) in enumerate(curves.items()):
            length = max(len(r) for r in runs)
            a = np.full((len(runs), length), np.nan)
            for j, r in enumerate(runs):
                a[j, :len(r)] = np.asarray(r, dtype=float)
            with warnings.catch_warnings():  # all-NaN rounds (round 0 of a divergence)
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(a, 0), np.nanstd(a, 0)
            x = np.arange(length)
            color = colors[i % len(colors)]
            ax.plot(x, mean, color=color, label=name)
            if len(runs) > 1:  # ± std, or min..max on a log axis (stays positive)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    lo, hi = (np.nanmin(a, 0), np.nanmax(a, 0)) if logy else (mean - std, mean + std)
                ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        if ptitle:
            ax.set_title(ptitle)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
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
