"""CLIP's eval transform split where the work is cheapest: the PIL stage (resize, crop, RGB) on CPU
readers, ToTensor + Normalize where the model is."""

from __future__ import annotations

import numpy as np


class Preprocessor:
    """open_clip's eval transform split in two: a PIL stage (resize, crop, RGB) run on CPU workers that
    yields uint8 pixels, and ``to_tensor_normalize`` (ToTensor + Normalize) run where the model is.

    When the transform does not have that shape, the whole transform runs on the CPU and images travel as
    float32 (``self.split`` is False).
    """

    def __init__(self, preprocess):
        from torchvision import transforms as T

        steps = list(getattr(preprocess, "transforms", []))
        idx = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
        tail = steps[idx + 1:] if idx is not None else []
        self.split = idx is not None and len(tail) == 1 and isinstance(tail[0], T.Normalize)
        self.preprocess = preprocess
        resize = next((s for s in steps if isinstance(s, T.Resize)), None)
        size = getattr(resize, "size", None)
        # the shortest side CLIP resizes to: a JPEG may be decoded at a reduced scale down to it
        self.draft_size = (size if isinstance(size, int) else max(size) if size else None)
        if self.split:
            self.pil_stage = T.Compose(steps[:idx]) if idx else (lambda im: im)
            self.mean = tuple(float(v) for v in tail[0].mean)
            self.std = tuple(float(v) for v in tail[0].std)

    def __call__(self, image) -> np.ndarray:
        """PIL image -> uint8 (3, H, W) when split, else float32 (3, H, W)."""
        if self.split:
            arr = np.asarray(self.pil_stage(image), dtype=np.uint8)
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            return np.ascontiguousarray(arr.transpose(2, 0, 1))
        return self.preprocess(image).numpy().astype(np.float32, copy=False)

    def to_tensor_normalize(self, pixels, device=None, dtype=None):
        """Batch of preprocessed images (uint8 when split) -> normalised float tensor, as ToTensor+Normalize."""
        import torch

        x = torch.as_tensor(pixels)
        if device is not None:
            x = x.to(device, non_blocking=True)
        if self.split:
            x = x.float().div(255)
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = x.sub(mean).div(std)
        return x.to(dtype) if dtype is not None else x
