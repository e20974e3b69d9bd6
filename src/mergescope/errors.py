"""The library's exceptions. Every error a user can cause is one of these, with one clear line
that names the file, key, layer or option at fault. The CLI prints that line and exits non-zero."""


class MergescopeError(Exception):
    """Base class: a user-facing error with a one-line message."""


class DataError(MergescopeError, FileNotFoundError):
    """A dataset is missing, unreadable or malformed."""


class CheckpointError(MergescopeError):
    """A checkpoint file is missing, truncated, corrupt or does not fit its architecture."""


class ConfigError(MergescopeError, ValueError):
    """An option or argument is out of range or inconsistent."""


class IncompatibleModelsError(MergescopeError, ValueError):
    """Two or more models (state_dicts) do not share keys, shapes or dtypes."""
