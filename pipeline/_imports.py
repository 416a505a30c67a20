"""Lazy imports of optional dependencies, with an error that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from pipeline.errors import MissingDependency

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
