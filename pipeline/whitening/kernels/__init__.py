"""Scoring kernels: the fused CuPy whitener on GPUs, torch/NumPy paths everywhere else.

``make_whitener(mean, whitening, device)`` returns an object with ``score(x) ->
(sqnorm, loglik)`` (float32 tensors of shape (B,)), ``whiten(x) -> (B, m)`` and
``score_and_whiten(x)``:

* :class:`~pipeline.whitening.kernels.fused.FusedWhitener` on a CUDA device when CuPy is importable
  (one kernel launch per batch, on torch's current stream);
* :class:`~pipeline.whitening.kernels.reference.TorchWhitener` otherwise (float64, exact to fp32
  output rounding).

``reference_scores(x, mean, whitening)`` is the float64 NumPy oracle for all of them.
Nothing here touches a GPU or imports CuPy at import time.
"""

from __future__ import annotations

import importlib

import torch

from pipeline.errors import MissingDependency
from pipeline.whitening.kernels.reference import GemmWhitener, TorchWhitener, reference_scores, reference_whiten

__all__ = ["make_whitener", "reference_scores", "reference_whiten", "score_towers",
           "TorchWhitener", "GemmWhitener", "MissingDependency", "BACKENDS"]

#: ``auto``: fused on CUDA when CuPy imports, else torch; ``fused``: the CuPy kernel (error
#: if unavailable); ``gemm``: unfused fp32 torch GEMM + norm; ``torch``: float64 torch.
BACKENDS = ("auto", "fused", "gemm", "torch")


def _cupy_importable() -> bool:
    try:
        importlib.import_module("cupy")
    except ImportError:
        return False
    return True


def make_whitener(mean, whitening, device, backend: str = "auto"):
    """A whitener for ``mean`` (d,) and ``whitening`` (d, m) that scores tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        backend = "fused" if device.type == "cuda" and _cupy_importable() else "torch"
    if backend == "torch":
        return TorchWhitener(mean, whitening, device)
    if backend == "gemm":
        return GemmWhitener(mean, whitening, device)
    from pipeline.whitening.kernels.fused import FusedWhitener
    return FusedWhitener(mean, whitening, device)


def score_towers(pairs):
    """Score several towers back to back on the current stream.

    ``pairs`` maps a tower name to ``(whitener, x)``; returns name -> ``(sqnorm, loglik)``.
    With fused whiteners this is one kernel launch per tower, with no synchronisation.
    """
    return {name: whitener.score(x) for name, (whitener, x) in pairs.items()}
