"""The encoder: CLIP image and text towers on batches of preprocessed samples, then whitening scores.
Knows nothing about Ray; :mod:`pipeline.runtime` wraps it in an actor."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.decode import Preprocessor
from pipeline.device_decode import DeviceImages, unsupported_reason
from pipeline.models import ModelSpec, load_spec

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Chunks arrive as read-only arrays from Ray's object store; the towers never write to their inputs.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True)
class EncodeConfig:
    """How the towers run."""

    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    precision: str = "auto"  # "auto" = bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16 / fp16
    batch_size: int = 256  # samples per forward pass
    normalize: bool = False  # L2-normalise embeddings before whitening (must match the fit)
    channels_last: bool = True  # NHWC memory format for conv stems on CUDA
    compile: bool = False  # torch.compile the towers (slow first batch, faster after)
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


class Encoder:
    """Holds one CLIP model on one device; turns chunks of preprocessed samples into embeddings/scores."""

    def __init__(self, spec: ModelSpec, cfg: EncodeConfig, stats=None):
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.cfg = cfg
        self.spec = spec
        self.model, self.preprocess, self.tokenizer = load_spec(spec, device=self.device)
        self.preprocessor = Preprocessor(self.preprocess)
        self.device_decode_unsupported = unsupported_reason(self.preprocess)  # None: --decode gpu works
        self._device_images = None
        on_cuda = self.device.type == "cuda"
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_cuda else "fp32")
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.precision = precision
        if on_cuda and cfg.channels_last:
            self.model.visual.to(memory_format=torch.channels_last)
        self._encode_image = self.model.encode_image
        self._encode_text = self.model.encode_text
        if cfg.compile:
            self._encode_image = torch.compile(self._encode_image)
            self._encode_text = torch.compile(self._encode_text)
        self.stats = stats  # StatsFile or None (fit mode)
        self.whiteners = {}
        if stats is not None:
            from pipeline.kernels import make_whitener

            for tower, ws in stats.towers.items():
                self.whiteners[tower] = make_whitener(ws.mean, ws.whitening, self.device)

    # -- towers ---------------------------------------------------------------------------------
    def _autocast(self):
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def embed_images(self, pixels):
        """(n, 3, H, W) preprocessed pixels (a NumPy array, or a tensor on the device) -> (n, d) float32 torch
        tensor on the device."""
        import torch

        outs = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(pixels), self.cfg.batch_size):
                batch = pixels[start:start + self.cfg.batch_size]
                if self.device.type == "cuda" and isinstance(batch, np.ndarray):
                    batch = torch.from_numpy(np.ascontiguousarray(batch)).pin_memory()
                x = self.preprocessor.to_tensor_normalize(batch, device=self.device)
                if self.device.type == "cuda" and self.cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                outs.append(self._encode_image(x).float())
        return self._post(torch.cat(outs))

    def embed_texts(self, tokens: np.ndarray):
        """(n, context) token ids -> (n, d) float32 torch tensor on the device."""
        import torch

        outs = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(tokens), self.cfg.batch_size):
                batch = torch.as_tensor(tokens[start:start + self.cfg.batch_size]).to(self.device, non_blocking=True)
                outs.append(self._encode_text(batch).float())
        return self._post(torch.cat(outs))

    def _post(self, emb):
        if self.cfg.normalize:
            emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return emb

    def decode_images(self, chunk: dict) -> tuple:
        """A chunk's image inputs as one uint8 pixel tensor on the device: its decoded ``pixels`` followed by
        its ``jpegs`` decoded here. Returns ``(pixels, ok, errors)``: ``ok`` the positions in ``image_rows``
        that have pixels (None: all), ``errors`` ``{position: message}`` for JPEGs that did not decode."""
        import torch

        pixels, jpegs = chunk.get("pixels"), chunk.get("jpegs")
        if not jpegs:
            return pixels, None, {}
        if self._device_images is None:
            self._device_images = DeviceImages(self.preprocess, self.device)
        before = 0 if pixels is None else len(pixels)
        parts, ok, errors = [], [np.arange(before)], {}
        if before:
            parts.append(torch.as_tensor(pixels).to(self.device))
        with torch.inference_mode():
            for start in range(0, len(jpegs), self.cfg.batch_size):  # bounds full-size decoded images in memory
                decoded, positions, failed = self._device_images.decode(jpegs[start:start + self.cfg.batch_size])
                if decoded is not None:
                    parts.append(decoded)
                ok.append(before + start + positions)
                errors.update({before + start + i: m for i, m in failed.items()})
        ok = np.concatenate(ok)
        return (torch.cat(parts) if parts else None), (ok if errors else None), errors

    # -- chunks ---------------------------------------------------------------------------------
    def process(self, chunk: dict, keep_embeddings: bool = False) -> dict:
        """Encode a chunk built by :func:`pipeline.runtime.build_chunk` and score it.

        Returns per-tower arrays aligned with ``chunk['image_rows']`` / ``chunk['text_rows']``; a failing
        tower yields ``{tower}_error`` instead of raising.
        """
        import torch

        out: dict = {}
        embs = {}
        for tower in ("image", "text"):
            ok = None  # positions in {tower}_rows that have an input (None: all of them)
            try:
                if tower == "image":
                    data, ok, errors = self.decode_images(chunk)
                    if errors:
                        out["image_decode_errors"] = errors
                else:
                    data = chunk.get("tokens")
                if data is None or len(data) == 0:
                    continue
                emb = (self.embed_images if tower == "image" else self.embed_texts)(data)
            except Exception as exc:  # a failing forward pass is recorded per row, not fatal
                out[f"{tower}_error"] = f"{tower} tower failed: {type(exc).__name__}: {exc}"
                continue
            n = len(chunk[f"{tower}_rows"])
            finite = torch.isfinite(emb).all(dim=1)
            out[f"{tower}_finite"] = _scatter(finite.cpu().numpy(), ok, n, False)
            embs[tower] = emb if ok is None else _scatter_rows(emb, ok, n)
            if keep_embeddings:
                out[f"{tower}_emb"] = _scatter(emb.cpu().numpy(), ok, n, np.nan)
            if tower in self.whiteners:
                sqnorm, loglik = self.whiteners[tower].score(emb)
                sqnorm = sqnorm.double().cpu().numpy()
                out[f"{tower}_sqnorm"] = _scatter(sqnorm, ok, n, np.nan)
                out[f"{tower}_loglik"] = _scatter(loglik.double().cpu().numpy(), ok, n, np.nan)
                out[f"{tower}_pvalue"] = _scatter(self.stats.towers[tower].pvalue_from_sqnorm(sqnorm), ok, n, np.nan)
        out["clip_score"] = self._clip_score(chunk, embs)
        return out

    @staticmethod
    def _clip_score(chunk: dict, embs: dict) -> Optional[np.ndarray]:
        """Cosine of image and text embeddings for rows that have both; NaN elsewhere."""
        import torch

        n = int(chunk["n"])
        score = np.full(n, np.nan, dtype=np.float64)
        if "image" not in embs or "text" not in embs:
            return score
        img_pos = {int(r): i for i, r in enumerate(chunk["image_rows"])}
        pairs = [(img_pos[int(r)], j, int(r)) for j, r in enumerate(chunk["text_rows"]) if int(r) in img_pos]
        if not pairs:
            return score
        ii, jj, rows = (list(t) for t in zip(*pairs))
        a = torch.nn.functional.normalize(embs["image"][ii].double(), dim=1)
        b = torch.nn.functional.normalize(embs["text"][jj].double(), dim=1)
        score[rows] = (a * b).sum(1).cpu().numpy()
        return score


def _scatter(values: np.ndarray, positions, n: int, fill) -> np.ndarray:
    """``values`` of rows ``positions`` into a length-``n`` array (``fill`` elsewhere); as is when None."""
    if positions is None:
        return values
    full = np.full((n, *values.shape[1:]), fill, dtype=values.dtype)
    full[positions] = values
    return full


def _scatter_rows(emb, positions: np.ndarray, n: int):
    """Torch version of :func:`_scatter` for embeddings (NaN rows where there was no input)."""
    import torch

    with torch.inference_mode():
        full = torch.full((n, emb.shape[1]), float("nan"), dtype=emb.dtype, device=emb.device)
        full[torch.as_tensor(positions, device=emb.device)] = emb
    return full
