"""`mergescope demo`: the main job (what `make demo` runs)."""

from __future__ import annotations

import typer

from mergescope import data as data_mod
from mergescope import models
from mergescope import train as train_mod
from mergescope.cli import app
from mergescope.cli.common import print_table
from mergescope.console import console


@app.command("demo")
def demo_cmd(epochs: int = typer.Option(2, "--epochs"), seed: int = typer.Option(0, "--seed")) -> None:
    """Train and evaluate an MLP on Fashion-MNIST (MNIST-1D when Fashion-MNIST is missing)."""
    name = data_mod.first_available(("fashion-mnist", "mnist1d"))
    if name != "fashion-mnist":
        console.print("Fashion-MNIST not found (sudo apt-get install dataset-fashion-mnist); using MNIST-1D")
    train, test = data_mod.load(name, "train"), data_mod.load(name, "test")
    net = models.build("mlp", train.input_shape, train.num_classes, seed=seed)
    train_mod.fit(net, train, optimizer="adam", lr=1e-3, epochs=epochs, seed=seed, eval_data=test)
    res = train_mod.evaluate(net, test)
    print_table(f"mlp on {name}", ["test loss", "test accuracy"], [[res["loss"], res["accuracy"]]])
