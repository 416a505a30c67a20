"""The CuPy backend: the fused whitener scores a batch already on the GPU in one kernel launch (its mixture is
:class:`~pipeline.whitening.kernels.torch_backend.TorchMixture` on the same device).

Embeddings arrive as torch tensors (fp32, fp16 or bf16) and are handed to CuPy through
DLPack without a copy; the kernel (``whiten.cu``) runs on torch's current stream, so no
synchronisation is added. CuPy is imported when a :class:`FusedWhitener` is built, never
at module import, and a missing CuPy raises an error that says ``pip install 'wclip[gpu]'``.

The tile constants and :func:`launch_grid` below must match ``whiten.cu``; the tests check
both against the source and emulate the kernel on the CPU.
"""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import torch

from pipeline.errors import require
from pipeline.whitening.formulas import half_m_log_2pi
from pipeline.whitening.kernels.reference import check_parameters

__all__ = ["FusedWhitener", "kernel_source", "launch_grid", "padded_shape", "entry_name",
           "ENTRY_POINTS", "COMPILE_OPTIONS", "TILE_ROWS", "TILE_COLS", "TILE_K", "THREADS"]

KERNEL_FILE = "whiten.cu"
TILE_ROWS = 64
TILE_COLS = 64
TILE_K = 16
THREADS = 256
#: NVRTC options used by CuPy here and by the device-free PTX check in the tests.
COMPILE_OPTIONS = ("--std=c++17",)
_DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
ENTRY_POINTS = tuple(f"wclip_{op}_{sfx}" for op in ("score", "whiten")
                     for sfx in _DTYPE_SUFFIX.values())


def kernel_source() -> str:
    """The CUDA C++ source of the kernels (``pipeline/whitening/kernels/whiten.cu``)."""
    return resources.files("pipeline.whitening.kernels").joinpath(KERNEL_FILE).read_text(encoding="utf-8")


def entry_name(dtype: torch.dtype, write_whitened: bool = False) -> str:
    """Kernel entry point for inputs of ``dtype``; TypeError for an unsupported dtype."""
    if dtype not in _DTYPE_SUFFIX:
        raise TypeError(f"the fused whitener takes float32, float16 or bfloat16 inputs; got {dtype}")
    return f"wclip_{'whiten' if write_whitened else 'score'}_{_DTYPE_SUFFIX[dtype]}"


def padded_shape(d: int, m: int) -> tuple[int, int]:
    """``(d_pad, m_pad)``: the zero-padded shape of the projection the kernel reads."""
    return TILE_K * math.ceil(d / TILE_K), TILE_COLS * math.ceil(m / TILE_COLS)


def launch_grid(rows: int, m: int) -> tuple[int, int]:
    """``(row tiles, column tiles)``: the kernel's grid for ``rows`` inputs and ``m`` directions."""
    if rows < 1 or m < 1:
        raise ValueError(f"rows and m must be positive; got rows={rows}, m={m}")
    return math.ceil(rows / TILE_ROWS), math.ceil(m / TILE_COLS)


class FusedWhitener:
    """Whitening, squared norm and log-likelihood of CUDA batches in one kernel launch.

    ``mean`` (d,) and ``whitening`` (d, m) are copied to ``device`` once, as fp32 (the
    projection zero-padded for the kernel). Accumulation is fp32 whatever the input dtype.
    """

    def __init__(self, mean: np.ndarray, whitening: np.ndarray, device=None):
        self._cp = require("cupy", "the fused GPU whitening kernel")
        mu, W = check_parameters(mean, whitening)
        if not torch.cuda.is_available():
            raise RuntimeError("FusedWhitener needs a CUDA GPU; use pipeline.whitening.kernels.make_whitener "
                               "to fall back to the CPU path")
        device = torch.device(device if device is not None else "cuda")
        if device.type != "cuda":
            raise ValueError(f"FusedWhitener runs on a CUDA device; got device={device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.d, self.m = W.shape
        d_pad, m_pad = padded_shape(self.d, self.m)
        proj = np.zeros((d_pad, m_pad), np.float32)
        proj[: self.d, : self.m] = W
        mean_pad = np.zeros(d_pad, np.float32)
        mean_pad[: self.d] = mu
        self._m_pad = m_pad
        self._proj = torch.from_numpy(proj).to(device)
        self._mean = torch.from_numpy(mean_pad).to(device)
        self._half_m_log2pi = np.float32(half_m_log_2pi(self.m))  # the kernel's constant, from formulas.py
        self._module = None
        self._counters: dict[int, tuple[torch.Tensor, object]] = {}
        with self._cp.cuda.Device(device.index):
            self._proj_cp = self._cp.from_dlpack(self._proj)
            self._mean_cp = self._cp.from_dlpack(self._mean)

    def __repr__(self) -> str:
        return f"FusedWhitener(d={self.d}, m={self.m}, device={self.device})"

    def _function(self, name: str):
        if self._module is None:
            self._module = self._cp.RawModule(code=kernel_source(), options=COMPILE_OPTIONS,
                                              backend="nvrtc")
        return self._module.get_function(name)

    def _input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor on {self.device}; got {type(x).__name__}")
        entry_name(x.dtype)
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but this whitener lives on {self.device}")
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must have shape (B, {self.d}); got {tuple(x.shape)}")
        return x if x.stride(1) == 1 else x.contiguous()

    def _counter_buffer(self, stream: torch.cuda.Stream, row_tiles: int):
        """Zeroed tile counters for launches on ``stream`` (the kernel leaves them zeroed)."""
        key = stream.cuda_stream
        held = self._counters.get(key)
        if held is None or held[0].numel() < row_tiles:
            size = max(row_tiles, 2 * held[0].numel() if held else 64)
            buf = torch.zeros(size, dtype=torch.int32, device=self.device)
            held = (buf, self._cp.from_dlpack(buf))
            self._counters[key] = held
        return held[1]

    def _launch(self, x: torch.Tensor, write_whitened: bool):
        x = self._input(x)
        rows = x.shape[0]
        name = entry_name(x.dtype, write_whitened)
        whitened = torch.empty((rows, self.m), dtype=torch.float32, device=self.device) \
            if write_whitened else None
        if rows == 0:
            empty = torch.empty(0, dtype=torch.float32, device=self.device)
            return empty, empty.clone(), whitened
        grid = launch_grid(rows, self.m)
        # One workspace: sqnorm, loglik, then the per-column-tile partial sums.
        work = torch.empty(rows * (2 + (grid[1] if grid[1] > 1 else 0)), dtype=torch.float32,
                           device=self.device)
        cp = self._cp
        stream = torch.cuda.current_stream(self.device)
        with cp.cuda.Device(self.device.index), cp.cuda.ExternalStream(stream.cuda_stream):
            x_view = x if x.dtype == torch.float32 else x.view(torch.int16)
            x_cp = cp.from_dlpack(x_view)
            work_cp = cp.from_dlpack(work)
            w_cp = cp.from_dlpack(whitened) if write_whitened else work_cp
            args = (x_cp, np.int64(x.stride(0)), np.int32(rows), np.int32(self.d),
                    self._mean_cp, self._proj_cp, np.int32(self._m_pad), np.int32(self.m),
                    self._half_m_log2pi, work_cp[2 * rows:] if grid[1] > 1 else work_cp,
                    self._counter_buffer(stream, grid[0]), work_cp[:rows],
                    work_cp[rows: 2 * rows], w_cp)
            self._function(name)((grid[0], grid[1], 1), (THREADS, 1, 1), args)
        return work[:rows], work[rows: 2 * rows], whitened

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqnorm, loglik)``: float32 (B,) tensors on the GPU, queued on torch's current stream."""
        sq, ll, _ = self._launch(x, write_whitened=False)
        return sq, ll

    def score_and_whiten(self, x: torch.Tensor):
        """``(sqnorm, loglik, whitened)``; ``whitened`` is float32 (B, m)."""
        return self._launch(x, write_whitened=True)

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """Whitened rows ``(x - mean) @ whitening``, float32 (B, m)."""
        return self._launch(x, write_whitened=True)[2]
