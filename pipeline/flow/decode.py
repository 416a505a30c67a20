"""Sample -> model inputs: decode the image and run CLIP's preprocessing up to the pixel tensor (or, with
``decode="gpu"``, check a JPEG's header and pass its bytes on to the encoder, :mod:`pipeline.flow.device_decode`),
read the caption and metadata; every problem becomes a per-sample ``status``/``error`` instead of an exception."""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipeline.config import InputConfig
from pipeline.flow.preprocess import Preprocessor
from pipeline.flow.read import RawSample

JPEG_MODES = ("L", "RGB", "CMYK")  # JPEG colour modes torchvision's decode_jpeg turns into RGB


@dataclass
class PreparedSample:
    """One output row's metadata plus whatever model input could be made for it."""

    row: dict  # key, index, url, uid, caption, status, error
    pixels: Optional[np.ndarray] = None
    jpeg: Optional[bytes] = None  # decode="gpu": the encoded image, decoded by the encoder actor
    caption: Optional[str] = None
    problems: list = field(default_factory=list)  # (stage, message)


def _check_size(image, cfg: InputConfig) -> None:
    """Refuse, from the header alone, images whose decode or CLIP resize would take unbounded memory."""
    width, height = image.size
    if width * height > cfg.max_image_pixels:
        raise ValueError(f"image is {width}x{height} = {width * height} pixels, over the "
                         f"{cfg.max_image_pixels}-pixel limit (decompression bomb?); raise "
                         f"--max-image-pixels if such images are legitimate")
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > cfg.max_aspect_ratio:
        raise ValueError(f"image is {width}x{height}, an aspect ratio of {ratio:.0f}:1, over the "
                         f"{cfg.max_aspect_ratio:g}:1 limit (CLIP's resize would make it {ratio:.0f} times "
                         f"wider than tall); raise --max-aspect-ratio if such images are legitimate")


# PIL modes whose values do not fit 8 bits: PIL's own convert("RGB") clips them (all white or black).
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_8bit(image):
    """A 16/32-bit integer or float single-channel image as 8-bit grey, scaled by the range its data uses:
    integers by 65535 (16-bit PNG and TIFF; 32-bit ones holding values above that by their maximum), floats
    in [0, 1] by 1, other floats by their maximum. Negative values become black."""
    from PIL import Image

    arr = np.asarray(image, dtype=np.float64)
    peak = float(np.nanmax(arr, initial=0.0))
    if image.mode == "F":
        top = 1.0 if peak <= 1.0 else peak
    else:
        top = max(65535.0, peak)
    scaled = np.clip(np.nan_to_num(arr) * (255.0 / top if top > 0 else 0.0), 0, 255)
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")


def _load_image(data: bytes, cfg: InputConfig, draft: int | None = None):
    """Decode an image to RGB (alpha over white, wide modes scaled). ``draft``: a JPEG is decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= ``draft`` pixels, which is what makes
    decoding large photos cheap when they are resized to CLIP's input anyway (img2dataset does the same)."""
    from PIL import Image

    if not data:
        raise ValueError("the image member is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning / palette warnings: we check ourselves
        image = Image.open(io.BytesIO(data))
        _check_size(image, cfg)
        if draft and image.format == "JPEG":
            image.draft("RGB", (draft, draft))
        image.load()
        if image.mode in _WIDE_MODES:
            image = _to_8bit(image)
        if image.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in image.info:
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")


def _device_jpeg(data: bytes, cfg: InputConfig) -> bool:
    """True when ``data`` is a JPEG whose header (read by PIL without decoding the pixels) says the encoder
    can decode it; False for anything else (other formats, unreadable headers), which is decoded here.
    Raises for a JPEG over the pixel limit."""
    from PIL import Image

    if not data.startswith(b"\xff\xd8\xff"):  # JPEG SOI marker
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data))
        except Exception:  # decoded here, which reports the same error as decode="cpu" does
            return False
        with image:
            if image.format != "JPEG" or image.mode not in JPEG_MODES:
                return False
            _check_size(image, cfg)
    return True


def _meta(members: dict, cfg: InputConfig, problems: list) -> dict:
    raw = members.get(cfg.meta_ext)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        return meta
    except RecursionError:
        problems.append(("metadata", f".{cfg.meta_ext} is nested too deeply to parse; url/uid left empty"))
        return {}
    except (UnicodeDecodeError, ValueError) as exc:
        problems.append(("metadata", f".{cfg.meta_ext} is not valid JSON ({exc}); url/uid left empty"))
        return {}


def _as_str(value) -> Optional[str]:
    return None if value is None else str(value)


def prepare_sample(sample: RawSample, url: str, cfg: InputConfig, preprocessor: Preprocessor) -> PreparedSample:
    """Decode one sample. Never raises for bad data: problems end up in the row's status and error."""
    try:
        return _prepare(sample, url, cfg, preprocessor)
    except Exception as exc:  # anything unforeseen in one sample is that sample's row, not the shard's failure
        row = {"key": sample.key, "shard": url, "index": sample.index, "url": None, "uid": None, "caption": None}
        return PreparedSample(row=row, problems=[("decode", f"sample could not be prepared: "
                                                           f"{type(exc).__name__}: {exc}")])


def _prepare(sample: RawSample, url: str, cfg: InputConfig, preprocessor: Preprocessor) -> PreparedSample:
    problems: list = []
    meta = _meta(sample.members, cfg, problems)
    row = {"key": sample.key, "shard": url, "index": sample.index,
           "url": _as_str(meta.get("url")), "uid": _as_str(meta.get("uid")), "caption": None}
    prepared = PreparedSample(row=row, problems=problems)
    problems.extend(("key", w) for w in sample.warnings)
    problems.extend(("read", s) for s in sample.skipped)
    if sample.error:
        problems.append(("read", sample.error))
    unread = bool(sample.error or sample.skipped)

    image_ext = next((e for e in cfg.image_exts if e in sample.members), None)
    if image_ext is None:
        if not unread:
            problems.append(("missing", f"no image member (.{'/.'.join(cfg.image_exts)}); members: "
                                        f"{sorted(sample.members) or 'none'}"))
    else:
        data = sample.members[image_ext]
        try:
            if cfg.decode == "gpu" and _device_jpeg(data, cfg):
                prepared.jpeg = data
            else:
                prepared.pixels = preprocessor(_load_image(data, cfg, preprocessor.draft_size if cfg.jpeg_draft
                                                           else None))
        except Exception as exc:  # any decoder failure is data, not a crash
            problems.append(("decode", f"image .{image_ext} could not be decoded: {type(exc).__name__}: {exc}"))

    caption_ext = next((e for e in cfg.caption_exts if e in sample.members), None)
    if caption_ext is None:
        if not unread:
            problems.append(("missing", f"no caption member (.{'/.'.join(cfg.caption_exts)})"))
    else:
        data = sample.members[caption_ext]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = data.decode("utf-8", errors="replace")
            problems.append(("decode", f"caption is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                                       f"scored with replacement characters"))
        text = text.strip()
        if not text:
            problems.append(("decode", "caption is empty"))
        else:
            if len(text) > cfg.max_caption_chars:
                text = text[: cfg.max_caption_chars]
            prepared.caption = text
            row["caption"] = text
    return prepared


_ADDRESS = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")  # an object's repr: "<_io.BytesIO object at 0x7f6d...>"


def stable_text(message: str) -> str:
    """``message`` without run-specific text: an object's repr loses its memory address (``<_io.BytesIO
    object at 0x7f6d...>`` -> ``<_io.BytesIO object>``), so identical failures have identical ``error``
    strings and group."""
    return _ADDRESS.sub(r"<\1>", message)


# Statuses, most severe first: the row's status is the first failed stage in this order.
STATUS_ORDER = ("read", "missing", "decode", "encode")
# Problems that are reported in ``error`` but leave a scored row ``ok``.
WARNING_STAGES = ("metadata", "key")


def finalize_status(prepared: PreparedSample) -> None:
    """Set ``status``/``error`` from the collected problems (``WARNING_STAGES`` are warnings on an ok row)."""
    stages = [s for s, _ in prepared.problems if s not in WARNING_STAGES]
    status = next((s for s in STATUS_ORDER if s in stages), "ok")
    messages = [stable_text(f"{s}: {m}" if s != status else m) for s, m in prepared.problems]
    prepared.row["status"] = status
    prepared.row["error"] = "; ".join(messages) if messages else None
