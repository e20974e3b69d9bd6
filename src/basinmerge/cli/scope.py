"""`basinmerge scope`: per-layer weight scopes of checkpoints, their pairwise mismatch and how
Gaussian the layers are; and the `experiment wsa-defaults` study."""

from __future__ import annotations

from pathlib import Path

import typer
from torch import nn

from basinmerge import checks, datasource, io, plots
from basinmerge import scope as scope_mod
from basinmerge.cli.app import app, experiment_app
from basinmerge.cli.common import (
    DATA_HELP,
    DATA_ROOT_OPT,
    DEVICE_OPT,
    FORCE_OPT,
    JSON_OPT,
    LIKE_OPT,
    SEQ_LEN_OPT,
    TOKENIZER_OPT,
    check_file_out,
    check_run_out,
    comma_list,
    command_line,
    on_interrupt,
    print_json,
    print_table,
)
from basinmerge.console import console
from basinmerge.errors import ConfigError
from basinmerge.scope import Scope

# --------------------------------------------------------------------------- scope command


def _load(path: Path) -> tuple[nn.Module | dict, dict]:
    """A model when the checkpoint is the project's (it names its architecture), else the bare
    state_dict (HF folders and bare files: scopes need tensors only); either refused if it holds
    NaN or Inf."""
    if io.checkpoint_format(path) != "basinmerge":
        return checks.load_state(path)
    return checks.load_model(path)


def _names(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


@app.command("scope")
def scope_cmd(
    checkpoints: list[Path] = typer.Argument(..., help="One or more checkpoints."),
    plot: Path = typer.Option(None, "--plot", help="Write per-layer histograms with the fitted "
                              "Gaussians to this PNG."),
    include_bias: bool = typer.Option(False, "--bias", help="Include the biases' scopes."),
    live: bool = typer.Option(False, "--live", help="Also the scopes of live units only (inputs "
                              "that are non-zero on some training example); needs data."),
    data: str = typer.Option(None, "--data", "--dataset", "-d", help=DATA_HELP + " Data for "
                             "--live (default: each checkpoint's dataset, train split)."),
    live_examples: int = typer.Option(1000, "--live-examples", help="Examples for --live."),
    seq_len: int = SEQ_LEN_OPT,
    tokenizer: str = TOKENIZER_OPT,
    like: Path = LIKE_OPT,
    root: str | None = DATA_ROOT_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Per-layer weight scopes (μ, σ), the pairwise scope mismatch (KL, reverse KL, squared W2)
    and how Gaussian each layer is (skewness, excess kurtosis, KS distance)."""
    check_file_out(plot, (".png",))
    names = _names(checkpoints)
    loaded = {n: _load(p) for n, p in zip(names, checkpoints, strict=True)}
    scopes = {n: scope_mod.weight_scope(m, include_bias=include_bias) for n, (m, _) in loaded.items()}
    first = names[0]
    for n in names[1:]:
        scope_mod.check_same_layers(scopes[first], scopes[n], (first, n))
    mismatch = scope_mod.pairwise_mismatch(scopes)
    fits = {n: scope_mod.fit_quality(m, include_bias=include_bias) for n, (m, _) in loaded.items()}
    live_scopes: dict[str, Scope] = {}
    if live:
        for (n, (_, meta)), path in zip(loaded.items(), checkpoints, strict=True):
            spec = data or meta.get("dataset")
            if spec is None:
                raise ConfigError(f"{n}: the checkpoint names no dataset; pass --data for --live")
            # A model runs: built from the file's record, its HF config or --like.
            m, meta = checks.load_model(path, like=like)
            ds = datasource.load(spec, split="train", n=live_examples, seq_len=seq_len,
                                 tokenizer=tokenizer, root=root, model=path)
            checks.check_data_fits(m, ds, meta=meta, source=n)
            masks = scope_mod.live_input_masks(m, ds)
            live_scopes[n] = scope_mod.weight_scope(m, include_bias=include_bias, input_masks=masks)
    if plot is not None:
        values = {n: scope_mod.layer_values(m, include_bias) for n, (m, _) in loaded.items()}
        io.save_figure(plots.weight_histograms(values, scopes, title="weight scopes"), plot)
    if as_json:
        print_json({
            "checkpoints": {n: str(p) for n, p in zip(names, checkpoints, strict=True)},
            "scopes": {n: s.to_dict() for n, s in scopes.items()},
            "live_scopes": {n: s.to_dict() for n, s in live_scopes.items()},
            "mismatch": mismatch,
            "fit_quality": {n: {k: f.to_dict() for k, f in fq.items()} for n, fq in fits.items()},
            "plot": str(plot) if plot is not None else None,
        })
        return
    cols, rows = scope_mod.scope_rows(scopes)
    if live_scopes:
        cols = cols + ["n live", "μ live", "σ live"]
        rows = [r + [live_scopes[r[1]][r[0]].count, live_scopes[r[1]][r[0]].mean,
                     live_scopes[r[1]][r[0]].std] for r in rows]
    print_table("weight scopes", cols, rows)
    if mismatch:
        rows = []
        for r in mismatch:
            worst = max(r["per_layer"], key=r["per_layer"].get)
            rows.append([r["a"], r["b"], r["kind"], r["total"], r["mean"], worst])
        print_table("pairwise scope mismatch (kl = KL(a‖b))", ["a", "b", "divergence", "total",
                                                                "mean per layer", "largest at"], rows)
    print_table("Gaussian fit quality", ["checkpoint", "layer", "skewness", "excess kurtosis", "KS"],
                [[n, k, f.skewness, f.excess_kurtosis, f.ks] for n, fq in fits.items()
                 for k, f in fq.items()])
    if plot is not None:
        console.print(f"saved {plot}")


# --------------------------------------------------------------------------- defaults study


@experiment_app.command("wsa-defaults")
def wsa_defaults_cmd(
    scale: str = typer.Option("quick", "--scale", help="smoke, quick (default) or full."),
    seeds: str = typer.Option(None, "--seeds", help="Comma-separated seeds (default: the scale's)."),
    variants: str = typer.Option(None, "--variants", help="Comma-separated variant names "
                                 "(default: all of the scale's)."),
    refresh_every: int = typer.Option(5, "--refresh-every", help="Steps between refreshes of "
                                      "the fused target."),
    out: Path = typer.Option(Path("runs/wsa-defaults"), "--out", "-o", help="Output folder."),
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
) -> None:
    """SGD vs Adam MLP pairs trained in lockstep toward their fused scope: which WSA divergence
    and reduction to use by default (scope mismatch, kurtosis, accuracy, barriers)."""
    import shlex

    from basinmerge.experiments import wsa_defaults
    from basinmerge.experiments.common import print_result, write_result

    seed_list = comma_list(seeds, "--seeds", int, "integers")
    names = comma_list(variants, "--variants")
    wsa_defaults.ScaleConfig.at(scale, seeds=seed_list, variants=names)  # checked before the run
    check_run_out(out, force)
    on_interrupt(f"nothing was saved (the study writes {out} when it ends). Run again: "
                 f"{command_line()}")
    result = wsa_defaults.run(scale=scale, seeds=seed_list, variants=names, device=device,
                              refresh_every=refresh_every)
    parts = ["basinmerge", "experiment", "wsa-defaults", "--scale", scale, "--out", str(out)]
    for opt, val in (("--seeds", seeds), ("--variants", variants)):
        if val is not None:
            parts += [opt, val]
    if refresh_every != 5:
        parts += ["--refresh-every", str(refresh_every)]
    result.command = " ".join(shlex.quote(p) for p in parts)
    write_result(result, out)
    print_result(result)
    console.print(f"wrote {out}")
