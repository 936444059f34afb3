"""Exception types shared by every backend.

Each error subclasses a builtin (``ValueError``/``ImportError``) so callers that do not know
this package still catch them the usual way, while the CLI can tell our errors, which carry a
message meant for a person, from genuine bugs.

``exit_status`` is what the ``densenet`` command exits with when the error reaches it: 2 when
what the user gave cannot be used (an option value, a file, a path), 1 when the command ran and
failed (a diverged run, a framework that cannot load), 130 when the user interrupted it.
"""

from __future__ import annotations

from typing import ClassVar


class DenseNetError(Exception):
    """Base class: an error whose message is meant for the user."""

    exit_status: ClassVar[int] = 2


class ConfigError(DenseNetError, ValueError):
    """A configuration that cannot describe a working DenseNet."""


class InputError(DenseNetError, ValueError):
    """An input array the network cannot take (rank, dtype, channels, size)."""


class BackendError(DenseNetError, ValueError):
    """An unknown backend name."""


class BackendUnavailable(DenseNetError, ImportError):
    """A known backend whose framework cannot be imported here."""

    exit_status = 1


class WeightFileError(DenseNetError, ValueError):
    """A weight file or weight dictionary that does not fit the network."""


class Failed(DenseNetError, RuntimeError):
    """The command ran and failed (a diverged run, a missing optional package)."""

    exit_status = 1


class Interrupted(DenseNetError, RuntimeError):
    """The user pressed Ctrl-C; the message says what was kept."""

    exit_status = 130


class Unsupported(DenseNetError, ValueError):
    """Something a backend does not offer (a ``densenet bench`` mode it has no way to run)."""

    exit_status = 1
