"""JPEG decode and CLIP preprocessing on the encoder's device (``--decode gpu``).

Reader tasks send JPEG bytes instead of pixels; the encoder decodes a batch of them with torchvision's
``decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on CPU), then applies the model's own ``Resize`` and
``CenterCrop`` transforms to the decoded uint8 tensors, so the pixels match the CPU path up to the resize
arithmetic (torch's float resampling instead of PIL's fixed-point one: a few pixel levels at most).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional

import numpy as np

from pipeline.flow.preprocess import Preprocessor


def _is_rgb_conversion(step) -> bool:
    """open_clip's "make it RGB" steps, which the decoder already does (``ImageReadMode.RGB``)."""
    if type(step).__name__ == "MaybeConvertMode":  # open_clip >= 2.24; passes tensors through
        return getattr(step, "mode", "RGB") == "RGB"
    return getattr(step, "__name__", None) == "_convert_to_rgb"  # older open_clip


def unsupported_reason(preprocess) -> Optional[str]:
    """Why ``preprocess`` cannot run on decoded tensors, or None when it can.

    Supported: the eval transforms open_clip builds, ``Resize`` / ``CenterCrop`` / convert-to-RGB, then
    ``ToTensor`` + ``Normalize``.
    """
    from torchvision import transforms as T

    pre = Preprocessor(preprocess)
    if not pre.split:
        return f"the model's preprocess does not end in ToTensor + Normalize: {preprocess!r}"
    steps = list(preprocess.transforms)
    for step in steps[:next(i for i, s in enumerate(steps) if isinstance(s, T.ToTensor))]:
        if not (isinstance(step, (T.Resize, T.CenterCrop)) or _is_rgb_conversion(step)):
            return f"the model's preprocess has a step that --decode gpu does not implement: {step!r}"
    return None


def _short(exc: Exception) -> str:
    """An exception as ``Type: message``, without torchvision's C++ source locations."""
    message = re.sub(r"[\w./-]+\.(?:cpp|cu|h|hpp):\d+,?\s*", "", str(exc)).strip(" ,")
    return f"{type(exc).__name__}: {message}"


class DeviceImages:
    """JPEG bytes -> preprocessed uint8 pixels (n, 3, H, W) on one torch device."""

    def __init__(self, preprocess, device):
        from torchvision import transforms as T

        reason = unsupported_reason(preprocess)
        if reason:
            raise ValueError(reason)
        self.device = device
        steps = list(preprocess.transforms)
        steps = steps[:next(i for i, s in enumerate(steps) if isinstance(s, T.ToTensor))]
        self.transform = T.Compose([s for s in steps if isinstance(s, (T.Resize, T.CenterCrop))])

    def decode(self, jpegs: list) -> tuple:
        """Decode and resize/crop ``jpegs`` (bytes). Returns ``(pixels, ok, errors)``: uint8 pixels of the
        images that decoded, their positions in ``jpegs``, and ``{position: message}`` for the others."""
        import torch

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) if len(b) else torch.empty(0, dtype=torch.uint8)
                for b in jpegs]
        decoded, errors = self._decode_all(data)
        ok = [i for i, image in enumerate(decoded) if image is not None]
        by_shape = defaultdict(list)  # same-size images (img2dataset resizes them all) go through at once
        for i in ok:
            by_shape[tuple(decoded[i].shape)].append(i)
        out = [None] * len(jpegs)
        for positions in by_shape.values():
            batch = self.transform(torch.stack([decoded[i] for i in positions]))
            for j, i in enumerate(positions):
                out[i] = batch[j]
        pixels = torch.stack([out[i] for i in ok]) if ok else None
        return pixels, np.asarray(ok, dtype=np.int64), errors

    def _decode_all(self, data: list) -> tuple:
        """All at once; when that raises, one by one so only the bad images fail."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)), {}
        except Exception:
            pass
        images, errors = [], {}
        for i, d in enumerate(data):
            try:
                images.append(self._decode_one(d))
            except Exception as exc:  # this image is data, not a crash
                images.append(None)
                errors[i] = f"image (JPEG) could not be decoded (torchvision decode_jpeg, {self.device}): {_short(exc)}"
        return images, errors

    def _decode_one(self, data):
        from torchvision.io import ImageReadMode, decode_jpeg

        if not data.numel():
            raise ValueError("the image member is empty (0 bytes)")
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except Exception:
            if self.device.type == "cpu":
                raise
        # nvJPEG refuses some valid files (e.g. lossless or 12-bit JPEGs): libjpeg-turbo on the CPU then.
        return decode_jpeg(data, mode=ImageReadMode.RGB, device="cpu").to(self.device)
