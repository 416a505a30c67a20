"""The encoder: CLIP image and text towers on chunks of preprocessed samples -> embeddings on the device.
Knows nothing about Ray; :mod:`pipeline.executors.ray` wraps it (in :mod:`pipeline.flow.stage`) in an actor."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipeline.config import EncodeConfig
from pipeline.flow.batch import TOWERS, Chunk
from pipeline.flow.device_decode import DeviceImages, unsupported_reason
from pipeline.flow.preprocess import Preprocessor
from pipeline.models import ModelSpec, load_spec

# Chunks arrive as read-only arrays from Ray's object store; the towers never write to their inputs.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class Encoder:
    """Holds one CLIP model on one device; turns chunks of preprocessed samples into embeddings."""

    def __init__(self, spec: ModelSpec, cfg: EncodeConfig):
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

    def decode_images(self, chunk: Chunk) -> tuple:
        """A chunk's image inputs as one uint8 pixel tensor on the device: its decoded ``pixels`` followed by
        its ``jpegs`` decoded here. Returns ``(pixels, ok, errors)``: ``ok`` the positions in ``image_rows``
        that have pixels (None: all), ``errors`` ``{position: message}`` for JPEGs that did not decode."""
        import torch

        pixels, jpegs = chunk.pixels, chunk.jpegs
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
    def encode(self, chunk: Chunk) -> dict:
        """Both towers on a chunk: ``{tower: TowerEmbeddings}``. A failing tower is recorded, not raised."""
        out = {}
        for tower in TOWERS:
            rows, errors = len(chunk.rows(tower)), {}
            try:
                if tower == "image":
                    data, ok, errors = self.decode_images(chunk)
                else:
                    data, ok = chunk.tokens, None
                if data is None or len(data) == 0:
                    out[tower] = TowerEmbeddings(rows=rows, decode_errors=errors)
                    continue
                emb = (self.embed_images if tower == "image" else self.embed_texts)(data)
            except Exception as exc:  # a failing forward pass is recorded per row, not fatal
                out[tower] = TowerEmbeddings(rows=rows, decode_errors=errors,
                                             error=f"{tower} tower failed: {type(exc).__name__}: {exc}")
                continue
            out[tower] = TowerEmbeddings(rows=rows, emb=emb, positions=ok, decode_errors=errors)
        return out


@dataclass
class TowerEmbeddings:
    """One tower's embeddings of a chunk, on the encoder's device (never leaves the actor)."""

    rows: int  # rows the chunk has for this tower
    emb: object = None  # (k, d) float32 torch tensor of the rows that had an input, or None
    positions: Optional[np.ndarray] = None  # which of the rows those k are (None: all of them, in order)
    decode_errors: dict = field(default_factory=dict)  # position -> message
    error: Optional[str] = None  # the tower failed on this chunk
