"""basinmerge: merging neural networks.

Weight Scope Alignment, permutation alignment (Git Re-Basin), soft merging, the common merge
baselines, linear-interpolation analysis and federated learning, on a functional core over
PyTorch state_dicts.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("basinmerge")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

from basinmerge.errors import (  # noqa: E402
    BasinmergeError,
    CheckpointError,
    ConfigError,
    DataError,
    IncompatibleModelsError,
)

__all__ = [
    "__version__",
    "BasinmergeError",
    "DataError",
    "CheckpointError",
    "ConfigError",
    "IncompatibleModelsError",
]
