"""Every kind of bad sample becomes a row with a status and an actionable error (no Ray needed)."""


import numpy as np
import pytest
from shardkit import image_bytes, png_bomb

import pipeline
from pipeline.config import InputConfig
from pipeline.flow.decode import finalize_status, prepare_sample
from pipeline.flow.preprocess import Preprocessor
from pipeline.flow.read import RawSample


@pytest.fixture(scope="module")
def pre():
    _, preprocess, _ = pipeline.load_clip("wclip-tiny", random_init=True)
    return Preprocessor(preprocess)


def run(pre, members, cfg=None, error=None):
    cfg = cfg or InputConfig()
    p = prepare_sample(RawSample("000000007", 7, members, error), "shard.tar", cfg, pre)
    finalize_status(p)
    return p


GOOD_TXT = b"a red circle"


def test_clean_sample(pre):
    p = run(pre, {"jpg": image_bytes(1), "txt": GOOD_TXT, "json": b'{"url": "u", "uid": "ab"}'})
    assert p.row["status"] == "ok" and p.row["error"] is None
    assert p.pixels.dtype == np.uint8 and p.pixels.shape == (3, 32, 32)
    assert p.caption == "a red circle" and p.row["url"] == "u" and p.row["uid"] == "ab"


@pytest.mark.parametrize("data,needle", [
    (b"", "empty (0 bytes)"),
    (b"\xff\xd8\xff\xe0 not really a jpeg", "could not be decoded"),
    (image_bytes(2)[:200], "could not be decoded"),  # truncated JPEG
])
def test_undecodable_image_keeps_the_caption_score(pre, data, needle):
    p = run(pre, {"jpg": data, "txt": GOOD_TXT})
    assert p.row["status"] == "decode"
    assert needle in p.row["error"] and ".jpg" in p.row["error"]
    assert p.pixels is None and p.caption == "a red circle"  # the text tower is still scored


def test_decompression_bomb_is_refused_before_decoding(pre):
    p = run(pre, {"png": png_bomb(), "txt": GOOD_TXT})
    assert p.row["status"] == "decode"
    assert "pixel" in p.row["error"] and "bomb" in p.row["error"].lower()
    small = run(pre, {"png": image_bytes(3, fmt="PNG"), "txt": GOOD_TXT}, InputConfig(max_image_pixels=100))
    assert small.row["status"] == "decode" and "--max-image-pixels" in small.row["error"]


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
                                      ("RGB", "WEBP")])
def test_image_modes_are_converted(pre, mode, fmt):
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    p = run(pre, {ext: image_bytes(4, mode=mode, fmt=fmt), "txt": GOOD_TXT})
    assert p.row["status"] == "ok", p.row["error"]
    assert p.pixels.shape == (3, 32, 32)


def test_missing_members(pre):
    p = run(pre, {"txt": GOOD_TXT})
    assert p.row["status"] == "missing" and "no image member" in p.row["error"]
    assert p.caption == "a red circle"
    q = run(pre, {"jpg": image_bytes(5)})
    assert q.row["status"] == "missing" and "no caption member" in q.row["error"]
    assert q.pixels is not None
    odd = run(pre, {"": b"stray file without extension"})
    assert odd.row["status"] == "missing"


def test_caption_problems(pre):
    bad = run(pre, {"jpg": image_bytes(6), "txt": b"caf\xe9 au lait"})
    assert bad.row["status"] == "decode" and "not valid UTF-8" in bad.row["error"]
    assert bad.caption == "caf\ufffd au lait"  # still scored, with a replacement character
    empty = run(pre, {"jpg": image_bytes(6), "txt": b"   \n"})
    assert empty.row["status"] == "decode" and "caption is empty" in empty.row["error"]
    assert empty.caption is None and empty.pixels is not None
    long = run(pre, {"jpg": image_bytes(6), "txt": b"word " * 50_000})
    assert long.row["status"] == "ok" and len(long.caption) == InputConfig().max_caption_chars


def test_malformed_json_is_a_warning_on_an_ok_row(pre):
    p = run(pre, {"jpg": image_bytes(7), "txt": GOOD_TXT, "json": b"{not json", "extra.bin": b"\0\1"})
    assert p.row["status"] == "ok"
    assert "metadata" in p.row["error"] and "not valid JSON" in p.row["error"]
    assert p.row["url"] is None and p.row["uid"] is None


def test_sample_cut_by_a_truncated_tar(pre):
    p = run(pre, {"jpg": image_bytes(8)}, error="the shard is truncated inside this sample")
    assert p.row["status"] == "read" and "truncated" in p.row["error"]


def test_configurable_member_names(pre):
    cfg = InputConfig(image_exts=("image.png",), caption_exts=("caption",))
    p = run(pre, {"image.png": image_bytes(9, fmt="PNG"), "caption": GOOD_TXT}, cfg)
    assert p.row["status"] == "ok"
