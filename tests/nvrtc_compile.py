"""Compile CUDA C++ source to PTX with NVRTC, without a GPU or a CUDA toolkit.

CuPy's compiler queries a device for its architecture, so a machine without a GPU cannot
use it to check that ``whiten.cu`` compiles. This module calls the NVRTC library directly
(through ctypes) for an explicit virtual architecture such as ``compute_90``.

The library is looked for, in order, in the ``nvidia-cuda-nvrtc-cu12`` wheel
(``nvidia/cuda_nvrtc/lib/libnvrtc.so.12``), in the CUDA 13 wheels that recent torch builds
depend on (``nvidia/cu13/lib/libnvrtc.so.13``, ``nvidia/cuda_nvrtc/lib/libnvrtc.so.13``),
and finally wherever the system's dynamic loader finds ``libnvrtc``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import re
from pathlib import Path

__all__ = ["NvrtcError", "NvrtcUnavailable", "find_nvrtc", "candidate_libraries", "nvrtc_version",
           "compile_to_ptx", "ptx_entries"]

#: Library file names inside the ``nvidia`` namespace package, most preferred first.
_WHEEL_CANDIDATES = ("cuda_nvrtc/lib/libnvrtc.so.12", "cu13/lib/libnvrtc.so.13",
                     "cuda_nvrtc/lib/libnvrtc.so.13")
_SYSTEM_NAMES = ("libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so")
_ENTRY = re.compile(r"^\s*(?:\.(?:visible|weak)\s+)?\.entry\s+([A-Za-z_$][\w$]*)", re.MULTILINE)


class NvrtcUnavailable(RuntimeError):
    """No NVRTC library could be loaded on this machine."""


class NvrtcError(RuntimeError):
    """NVRTC rejected a program; the message holds the compiler log."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def _wheel_libraries() -> list[Path]:
    """Candidate NVRTC libraries shipped in ``nvidia-*`` wheels on ``sys.path``, preferred first."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for rel in _WHEEL_CANDIDATES:
        for root in spec.submodule_search_locations:
            path = Path(root) / rel
            if path.is_file() and path not in found:
                found.append(path)
    return found


def candidate_libraries() -> list[str]:
    """Every NVRTC library this module would try, most preferred first (not all may load)."""
    names = [str(p) for p in _wheel_libraries()]
    located = ctypes.util.find_library("nvrtc")
    return names + ([located] if located else []) + list(_SYSTEM_NAMES)


@functools.lru_cache(maxsize=None)
def _open(library: str) -> ctypes.CDLL:
    return ctypes.CDLL(library)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL, str]:
    """The preferred loadable NVRTC library and its path or soname."""
    tried = []
    for name in candidate_libraries():
        try:
            return _open(name), name
        except OSError as exc:
            tried.append(f"{name}: {exc}")
    raise NvrtcUnavailable("no NVRTC library could be loaded; install it with "
                           "`pip install nvidia-cuda-nvrtc-cu12` (no GPU needed). Tried: "
                           + "; ".join(tried))


def _library(library: str | None) -> ctypes.CDLL:
    if library is None:
        return _load()[0]
    try:
        return _open(library)
    except OSError as exc:
        raise NvrtcUnavailable(f"cannot load NVRTC library {library}: {exc}") from exc


def find_nvrtc() -> str:
    """Path or soname of the NVRTC library used by default; :class:`NvrtcUnavailable` if none."""
    return _load()[1]


def nvrtc_version(library: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of the default (or the given) NVRTC library."""
    lib = _library(library)
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(lib: ctypes.CDLL, status: int, call: str, log: str = "") -> None:
    if status != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        what = lib.nvrtcGetErrorString(status).decode(errors="replace")
        message = f"{call} failed: {what} (nvrtcResult {status})"
        if log:
            message += f"\ncompiler log:\n{log}"
        raise NvrtcError(message, log)


def _program_log(lib: ctypes.CDLL, prog: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) != 0 or size.value <= 1:
        return ""
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace").strip()


def compile_to_ptx(source: str, arch: str = "compute_90", options=(),
                   name: str = "kernel.cu", library: str | None = None) -> str:
    """PTX text for ``source`` compiled for the virtual architecture ``arch``.

    Raises :class:`NvrtcError` (with the compiler log) when the source does not compile and
    :class:`NvrtcUnavailable` when no NVRTC library is installed. ``library`` picks one of
    :func:`candidate_libraries` instead of the default.
    """
    if not re.fullmatch(r"compute_\d+[a-z]?", arch):
        raise ValueError(f"arch must be a virtual architecture such as 'compute_90'; got {arch!r}")
    lib = _library(library)
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(),
                                       0, None, None), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}", *options]
        c_opts = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        status = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        _check(lib, status, f"nvrtcCompileProgram({name}, {' '.join(opts)})",
               _program_log(lib, prog))
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
        return buf.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def ptx_entries(ptx: str) -> list[str]:
    """Names of the kernels (``.entry`` directives) defined in a PTX module."""
    return _ENTRY.findall(ptx)
