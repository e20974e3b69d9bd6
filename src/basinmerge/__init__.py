"""basinmerge: merging neural networks.

Weight Scope Alignment, permutation alignment (Git Re-Basin), soft merging, the common merge
baselines, linear-interpolation analysis and federated learning, on a functional core over
PyTorch state_dicts.
"""

from basinmerge.errors import (
    BasinmergeError,
    CheckpointError,
    ConfigError,
    DataError,
    IncompatibleModelsError,
    NonFiniteError,
)

__all__ = [
    "__version__",
    "BasinmergeError",
    "DataError",
    "CheckpointError",
    "ConfigError",
    "IncompatibleModelsError",
    "NonFiniteError",
]


def __getattr__(name: str) -> str:
    """`__version__`, read from the installed metadata on first use (importing
    `importlib.metadata` costs tens of milliseconds that `basinmerge --help` should not pay)."""
    if name != "__version__":
        raise AttributeError(f"module 'basinmerge' has no attribute '{name}'")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("basinmerge")
    except PackageNotFoundError:  # running from a source tree without installation
        value = "0.1.0"
    globals()["__version__"] = value
    return value
