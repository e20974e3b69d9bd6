"""The library's exceptions. Every error a user can cause is one of these, with one clear line
that names the file, key, layer or option at fault. The CLI prints that line and exits non-zero."""


class BasinmergeError(Exception):
    """Base class: a user-facing error with a one-line message."""


class DataError(BasinmergeError, FileNotFoundError):
    """A dataset is missing, unreadable or malformed."""


class CheckpointError(BasinmergeError):
    """A checkpoint file is missing, truncated, corrupt or does not fit its architecture."""


class ConfigError(BasinmergeError, ValueError):
    """An option or argument is out of range or inconsistent."""


class IncompatibleModelsError(BasinmergeError, ValueError):
    """Two or more models (state_dicts) do not share keys, shapes or dtypes."""


class FederatedError(BasinmergeError):
    """A federated run cannot go on (a round in which every client failed, a Flower run that
    failed on the server)."""


class NonFiniteError(IncompatibleModelsError):
    """Weights, statistics or a training loss hold NaN or Inf values (named by file, key, step).

    A subclass of `IncompatibleModelsError` because a non-finite member is the one model that
    cannot take part in a merge; catch `NonFiniteError` for the bad-value policy alone."""


class DataMismatchError(DataError, ConfigError):
    """Data that does not fit the model it is given to (input shape, token ids past the
    vocabulary, labels past the model's classes), named by data spec and model before any
    long work (`basinmerge.checks.check_data_fits`). Both a `DataError` and a `ConfigError`,
    so callers catching either keep working."""
