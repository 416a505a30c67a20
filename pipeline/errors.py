"""Every error wclip shows a person: each says what is wrong and what to do, in one line.

The command line prints :class:`WclipError` subclasses without a traceback and exits with code 2.
"""

from __future__ import annotations


class WclipError(Exception):
    """A problem the user can fix; printed as one line."""


class UserError(WclipError):
    """Bad flags or inputs given on the command line."""


class ConfigError(WclipError, ValueError):
    """A configuration that cannot work (model/stats mismatch, clashing outputs); raised before any work."""


class StatsFileError(WclipError, ValueError):
    """A file is not a valid wclip stats file (or not for this model)."""


class MissingDependency(WclipError, ImportError):
    """An optional dependency is not installed; the message names the package to install."""


class TransportError(Exception):
    """Reading a shard failed in the transport (network, pipe, stall), not in its contents: the shard is
    retried and, if it keeps failing, recorded as failed; never treated as damage."""
