"""Exceptions that callers catch without importing the heavy modules that raise them.

:class:`raymix.config.ConfigError` (bad input, exit status 2) lives beside the config;
the errors here are raised once a run has started (exit status 1).
"""

from __future__ import annotations


class RunFailedError(RuntimeError):
    """A run that stopped with an error (a non-finite loss, a failed worker group)."""
