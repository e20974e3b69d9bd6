"""The registered federated strategies, one class per file (each file registers its class).

Adding a strategy = one file here (a `basinmerge.fl.strategy.Strategy` subclass with its
declared `options`, decorated with `@register`) + one import line below.
The import order below is the order `--help` lists them in.
"""
# ruff: noqa: I001

from basinmerge.fl.strategies.fedavg import FedAvg
from basinmerge.fl.strategies.fedprox import FedProx
from basinmerge.fl.strategies.wsa import WSA
from basinmerge.fl.strategies.scaffold import Scaffold
from basinmerge.fl.strategies.feddyn import FedDyn
from basinmerge.fl.strategies.moon import Moon
from basinmerge.fl.strategies.fedbn import FedBN

__all__ = ["WSA", "FedAvg", "FedBN", "FedDyn", "FedProx", "Moon", "Scaffold"]
