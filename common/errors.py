"""Exception types shared by every backend.

Each error subclasses a builtin (``ValueError``/``ImportError``) so callers that do not know
this package still catch them the usual way, while the CLI can tell our errors, which carry a
message meant for a person, from genuine bugs.
"""

from __future__ import annotations


class DenseNetError(Exception):
    """Base class: an error whose message is meant for the user."""


class ConfigError(DenseNetError, ValueError):
    """A configuration that cannot describe a working DenseNet."""


class InputError(DenseNetError, ValueError):
    """An input array the network cannot take (rank, dtype, channels, size)."""


class BackendError(DenseNetError, ValueError):
    """An unknown backend name."""


class BackendUnavailable(DenseNetError, ImportError):
    """A known backend whose framework cannot be imported here."""


class WeightFileError(DenseNetError, ValueError):
    """A weight file or weight dictionary that does not fit the network."""
