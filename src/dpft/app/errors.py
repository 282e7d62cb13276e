"""The errors the ``dpft`` command reports as one line (no heavy imports, so that the
command can catch them without importing torch first)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in the job's configuration (the CLI prints it on one line, exit code 2)."""


class DataUnavailable(RuntimeError):
    """A model or dataset cannot be found on this machine (message says what to install)."""


class RunFailed(RuntimeError):
    """A run stopped on a fault (a non-finite loss, a file that cannot be written).

    The message is one line: what happened, what was saved and how to continue,
    and the ε already spent (it is spent whether or not the run finished).
    The CLI prints it and exits with code 1.
    """
