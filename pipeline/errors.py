"""Every error wclip shows a person: each says what is wrong and what to do, in one line.

The command line prints :class:`WclipError` subclasses without a traceback and exits with code 2. Optional
dependencies are imported lazily through :func:`require`, whose error says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType


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


_HINTS = {
    "cupy": "pip install 'wclip[gpu]'  (CuPy for CUDA 12; use cupy-cuda11x on CUDA 11)",
    "s3fs": "pip install 'wclip[s3]'",
    "gcsfs": "pip install gcsfs",
    "matplotlib": "pip install matplotlib",
    "open_clip": "pip install open_clip_torch",
    "ray": "pip install 'ray[default]'",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming what to install for ``purpose``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = _HINTS.get(module.split(".")[0], f"pip install {module.split('.')[0]}")
        raise MissingDependency(f"{purpose} needs the '{module}' package, which is not importable "
                                f"({exc}). Install it with: {hint}") from exc
