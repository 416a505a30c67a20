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


# -- wide pixel formats, thin images, hostile metadata ------------------------------------------------------
import io  # noqa: E402

from PIL import Image  # noqa: E402

from pipeline.flow.decode import _load_image  # noqa: E402


def _encoded(array, mode, fmt) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt)
    return buf.getvalue()


def test_16_bit_png_keeps_its_values_scaled_to_8_bits():
    ramp = (np.arange(64, dtype=np.uint32) * 1040).astype(np.uint16).reshape(8, 8)  # 0 .. 65520
    data = _encoded(ramp, None, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = np.asarray(_load_image(data, InputConfig()))
    assert pixels.shape == (8, 8, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    np.testing.assert_array_equal(pixels[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))
    assert pixels.min() == 0 and pixels.max() == 255  # neither all white nor all black


def test_tiff_integer_and_float_modes_are_scaled():
    ints = (np.arange(64, dtype=np.int32) * 1000).reshape(8, 8)  # 16-bit data in a 32-bit TIFF
    pixels = np.asarray(_load_image(_encoded(ints, "I", "TIFF"), InputConfig()))[..., 0]
    np.testing.assert_array_equal(pixels, np.round(ints / 65535 * 255).astype(np.uint8))
    floats = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels = np.asarray(_load_image(_encoded(floats, "F", "TIFF"), InputConfig()))[..., 0]
    np.testing.assert_array_equal(pixels, np.round(floats.astype(np.float64) * 255).astype(np.uint8))
    assert 0 < pixels.mean() < 255


def test_a_thin_image_is_refused_before_the_resize(pre):
    import resource

    thin = _encoded(np.zeros((1, 100_000), np.uint8), "L", "PNG")
    assert len(thin) < 1000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    p = run(pre, {"png": thin, "txt": GOOD_TXT})
    assert p.row["status"] == "decode" and p.pixels is None
    assert "aspect ratio of 100000:1, over the 50:1 limit" in p.row["error"]
    assert "--max-aspect-ratio" in p.row["error"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    wide = _encoded(np.zeros((10, 400), np.uint8), "L", "PNG")  # 40:1 is within the default
    assert run(pre, {"png": wide, "txt": GOOD_TXT}).row["status"] == "ok"


def test_deeply_nested_json_is_that_rows_warning(pre):
    p = run(pre, {"jpg": image_bytes(1), "txt": GOOD_TXT, "json": b"[" * 100_000 + b"]" * 100_000})
    assert p.row["status"] == "ok" and p.row["url"] is None
    assert p.row["error"] == "metadata: .json is nested too deeply to parse; url/uid left empty"


def test_skipped_members_and_odd_names_reach_the_row(pre):
    sample = RawSample("caf\\xe9", 3, {"txt": GOOD_TXT}, None,
                       warnings=["member name is not valid UTF-8; the key is shown with \\x escapes: caf\\xe9"],
                       skipped=["member .jpg is 5000 bytes, over the 4096-byte limit"])
    p = prepare_sample(sample, "shard.tar", InputConfig(), pre)
    finalize_status(p)
    assert p.row["status"] == "read" and p.row["key"] == "caf\\xe9"
    assert "over the 4096-byte limit" in p.row["error"] and "not valid UTF-8" in p.row["error"]
    assert "no image member" not in p.row["error"]


def test_jpeg_draft_decodes_large_photos_at_a_reduced_scale_within_a_few_levels(pre):
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = (np.linspace(0, 255, 800)[None, :, None] * np.ones((600, 1, 3)) + rng.normal(0, 10, (600, 800, 3)))
    data = _encoded(photo.clip(0, 255).astype(np.uint8), "RGB", "JPEG")
    assert pre.draft_size == 32  # wclip-tiny's input side
    drafted = _load_image(data, InputConfig(), draft=pre.draft_size)
    assert min(drafted.size) >= pre.draft_size and drafted.size == (100, 75)  # 1/8 scale still covers 32
    assert _load_image(data, InputConfig()).size == (800, 600)
    full, reduced = pre(_load_image(data, InputConfig())).astype(int), pre(drafted).astype(int)
    assert full.shape == reduced.shape == (3, 32, 32) and np.abs(full - reduced).mean() < 3
    png = _encoded(photo.clip(0, 255).astype(np.uint8), "RGB", "PNG")
    assert _load_image(png, InputConfig(), draft=32).size == (800, 600)  # only JPEG has DCT scales
    assert isinstance(drafted, Image.Image) and drafted.mode == "RGB"
    off = run(pre, {"jpg": data, "txt": GOOD_TXT}, cfg=InputConfig(jpeg_draft=False))
    on = run(pre, {"jpg": data, "txt": GOOD_TXT})
    assert np.array_equal(off.pixels, full) and np.array_equal(on.pixels, reduced)


def test_identical_decode_failures_have_identical_errors_without_memory_addresses(pre):
    from collections import Counter

    from pipeline.flow.decode import stable_text

    garbage = b"\x89PNG not an image at all"  # PIL: "cannot identify image file <_io.BytesIO object at 0x...>"
    rows = [run(pre, {"png": garbage, "txt": GOOD_TXT}).row for _ in range(3)]
    rows.append(run(pre, {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": GOOD_TXT}).row)
    groups = Counter(r["error"] for r in rows)
    assert sorted(groups.values()) == [1, 3], groups
    assert all(" at 0x" not in e for e in groups), groups
    assert "image .png could not be decoded: UnidentifiedImageError: cannot identify image file " \
           "<_io.BytesIO object>" in groups
    assert stable_text("x <Foo at 0xDEADbeef1> y <a at 0x1>") == "x <Foo> y <a>"
