"""Scoring backends: one whitener and one mixture per backend, every log-likelihood from
:mod:`pipeline.whitening.formulas`.

=========  =====================================================  ==============================================
backend    whitener                                               mixture (the local likelihood)
=========  =====================================================  ==============================================
``numpy``  :class:`~.numpy_backend.NumpyWhitener` (float32 GEMM)  :class:`~.numpy_backend.NumpyMixture`
``torch``  :class:`~.torch_backend.TorchWhitener` (float64)       :class:`~.torch_backend.TorchMixture`
``gemm``   :class:`~.torch_backend.GemmWhitener` (float32)        :class:`~.torch_backend.TorchMixture`
``fused``  :class:`~.cupy_backend.FusedWhitener` (CUDA kernel)    :class:`~.torch_backend.TorchMixture` (CUDA)
=========  =====================================================  ==============================================

``make_whitener(stats, device, backend)`` and ``make_mixture(clusters, device, backend)`` pick them; ``auto`` is
the tar path's choice: ``fused`` on a CUDA device when CuPy imports, else ``torch``. Every whitener has
``score(x) -> (sqnorm, loglik)``, ``whiten(x)`` and ``score_and_whiten(x)``, every mixture ``mixture(w, sqnorm,
...) -> (cluster, local loglik, s_own)``. :class:`~.blocks.BlockScorer` is the embeddings path's per-block call
(NumPy by default, any torch device on request). ``reference_scores(x, mean, whitening)`` is the float64 NumPy
oracle for all of them. Nothing here imports torch or CuPy at import time (the embeddings path runs without torch).
"""

from __future__ import annotations

import importlib

from pipeline.errors import MissingDependency
from pipeline.whitening.kernels.reference import reference_scores, reference_whiten

__all__ = ["make_whitener", "make_mixture", "whitener_parameters", "resolve_backend", "reference_scores",
           "reference_whiten", "score_towers", "TorchWhitener", "GemmWhitener", "MissingDependency", "BACKENDS"]

#: ``auto``: fused on CUDA when CuPy imports, else torch; ``fused``: the CuPy kernel (error if unavailable);
#: ``gemm``: unfused fp32 torch GEMM + norm; ``torch``: float64 torch; ``numpy``: float32 NumPy (CPU only).
BACKENDS = ("auto", "fused", "gemm", "torch", "numpy")


def __getattr__(name):  # the torch whiteners, imported (with torch) when first asked for
    if name in ("TorchWhitener", "GemmWhitener", "TorchMixture"):
        from pipeline.whitening.kernels import torch_backend

        return getattr(torch_backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cupy_importable() -> bool:
    try:
        importlib.import_module("cupy")
    except ImportError:
        return False
    return True


def _device_type(device) -> str:
    """``"cpu"``, ``"cuda"``, ...: of a torch device or its name, without importing torch for a name."""
    if isinstance(device, str):
        return device.split(":", 1)[0]
    return device.type


def resolve_backend(device, backend: str = "auto") -> str:
    """The backend ``backend`` means on ``device``: ``auto`` is ``fused`` on CUDA when CuPy imports, else
    ``torch``; ``numpy`` only on the CPU. A ValueError names a backend that is not one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    kind = _device_type(device)
    if backend == "numpy" and kind != "cpu":
        raise ValueError(f"the numpy backend runs on the CPU; got device={device}")
    if backend == "auto":
        return "fused" if kind == "cuda" and _cupy_importable() else "torch"
    return backend


def whitener_parameters(stats) -> tuple:
    """``(mean, whitening)`` of a tower's stats (anything with ``.mean`` and ``.whitening``) or of a pair."""
    if hasattr(stats, "whitening"):
        return stats.mean, stats.whitening
    mean, whitening = stats
    return mean, whitening


def make_whitener(stats, device="cpu", backend: str = "auto"):
    """A whitener for ``stats`` (a :class:`~pipeline.whitening.stats.WhiteningStats`, anything with ``.mean``
    (d,) and ``.whitening`` (d, m), or a ``(mean, whitening)`` pair) that scores rows on ``device``."""
    backend = resolve_backend(device, backend)
    mean, whitening = whitener_parameters(stats)
    if backend == "numpy":
        from pipeline.whitening.kernels.numpy_backend import NumpyWhitener

        return NumpyWhitener(mean, whitening)
    from pipeline.whitening.kernels import torch_backend

    if backend == "torch":
        return torch_backend.TorchWhitener(mean, whitening, device)
    if backend == "gemm":
        return torch_backend.GemmWhitener(mean, whitening, device)
    from pipeline.whitening.kernels.cupy_backend import FusedWhitener

    return FusedWhitener(mean, whitening, device)


def make_mixture(clusters, device="cpu", backend: str = "auto"):
    """The mixture of ``clusters`` (a :class:`~pipeline.whitening.clusters.ClusterWhitening`) for the whitened
    rows of :func:`make_whitener`'s whitener with the same ``device`` and ``backend``: NumPy for ``numpy``,
    torch on ``device`` for the others (the CuPy backend's rows are torch tensors on the GPU)."""
    if resolve_backend(device, backend) == "numpy":
        from pipeline.whitening.kernels.numpy_backend import NumpyMixture

        return NumpyMixture(clusters)
    from pipeline.whitening.kernels.torch_backend import TorchMixture

    return TorchMixture(clusters, device)


def score_towers(pairs):
    """Score several towers back to back on the current stream.

    ``pairs`` maps a tower name to ``(whitener, x)``; returns name -> ``(sqnorm, loglik)``.
    With fused whiteners this is one kernel launch per tower, with no synchronisation.
    """
    return {name: whitener.score(x) for name, (whitener, x) in pairs.items()}
