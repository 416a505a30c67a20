"""``--decode gpu``: JPEGs decoded by the encoder actor (torchvision ``decode_jpeg`` on its device) give the
same rows as the default CPU decode, and bad images still become ``decode`` rows. The device path runs
on ``--device cpu`` here; the ``gpu``-marked variant repeats it on CUDA."""


import numpy as np
import pyarrow.parquet as pq
import pytest
from shardkit import clean_shards, image_bytes, marker, sample, state, write_shard

import pipeline
from pipeline.config import InputConfig
from pipeline.flow.decode import _load_image, finalize_status, prepare_sample
from pipeline.flow.device_decode import DeviceImages, unsupported_reason
from pipeline.flow.preprocess import Preprocessor
from pipeline.flow.read import RawSample
from pipeline.whitening import StatsFile

CHUNK = 8


def _corrupt_jpeg(seed: int) -> bytes:
    """A JPEG whose header reads fine but whose entropy-coded data stops halfway."""
    data = image_bytes(seed, size=(64, 64))
    return data[: len(data) // 2]


def mixed_samples() -> list:
    """Clean JPEGs of several sizes with, in the same chunks, the cases the device path must handle."""
    samples = [sample(i) for i in range(24)]
    swap = {
        3: {"jpg": _corrupt_jpeg(3)},                               # decoded on the device, fails there
        5: {"png": image_bytes(5, fmt="PNG")},                      # not a JPEG: decoded by the reader
        7: {"jpg": image_bytes(7, mode="L")},                       # grayscale JPEG -> RGB
        9: {"jpg": image_bytes(9, mode="CMYK")},                    # CMYK JPEG -> RGB
        11: {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg"},         # unreadable header: reader reports it
        12: {"jpg": _corrupt_jpeg(12)},                             # the same in the next chunk
        13: {"jpg": b""},                                           # empty member
        15: {"jpg": image_bytes(15, size=(64, 48))},                # other sizes (grouped by shape)
        17: {"jpg": image_bytes(17, size=(300, 200))},
        19: {"webp": image_bytes(19, fmt="WEBP")},
    }
    for i, members in swap.items():
        key, old = samples[i]
        samples[i] = (key, {**{k: v for k, v in old.items() if k != "jpg"}, **members})
    return samples


BAD = {3, 11, 12, 13}


# -- reader side (no Ray) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_preprocess():
    _, preprocess, _ = pipeline.load_clip("wclip-tiny", random_init=True)
    return preprocess


def _prepare(preprocess, members, cfg):
    p = prepare_sample(RawSample("000000007", 7, members, None), "shard.tar", cfg, Preprocessor(preprocess))
    finalize_status(p)
    return p


def test_readers_pass_jpeg_bytes_and_decode_the_rest(tiny_preprocess):
    gpu = InputConfig(decode="gpu")
    jpg = image_bytes(1)
    p = _prepare(tiny_preprocess, {"jpg": jpg, "txt": b"a cat"}, gpu)
    assert p.row["status"] == "ok" and p.jpeg == jpg and p.pixels is None
    p = _prepare(tiny_preprocess, {"png": image_bytes(1, fmt="PNG"), "txt": b"a cat"}, gpu)
    assert p.row["status"] == "ok" and p.jpeg is None and p.pixels.shape == (3, 32, 32)
    p = _prepare(tiny_preprocess, {"jpg": jpg, "txt": b"a cat"}, InputConfig())  # default: unchanged
    assert p.jpeg is None and p.pixels.dtype == np.uint8


def test_reader_header_check_still_refuses_bombs(tiny_preprocess):
    p = _prepare(tiny_preprocess, {"jpg": image_bytes(1), "txt": b"a cat"},
                 InputConfig(decode="gpu", max_image_pixels=1000))  # 40x40 = 1600 pixels
    assert p.row["status"] == "decode" and "1000-pixel limit" in p.row["error"] and p.jpeg is None


def test_decode_place_is_validated():
    with pytest.raises(ValueError, match="decode must be one of"):
        InputConfig(decode="nvjpeg")


def test_unsupported_preprocess_is_named(tiny_preprocess):
    from torchvision import transforms as T

    assert unsupported_reason(tiny_preprocess) is None
    odd = T.Compose([T.RandomResizedCrop(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert "RandomResizedCrop" in unsupported_reason(odd)
    assert "ToTensor + Normalize" in unsupported_reason(T.Compose([T.Resize(32), T.ToTensor()]))
    with pytest.raises(ValueError, match="RandomResizedCrop"):
        DeviceImages(odd, "cpu")


def test_device_pixels_match_pil_within_three_levels(tiny_preprocess):
    """Same decoder (libjpeg-turbo) on the CPU; the resize differs: torch's float bicubic+antialias vs PIL's
    fixed-point one. Measured: at most 3 levels of 255 apart, mean 0.05-0.22 levels."""
    import torch

    images = [image_bytes(s, size=size) for s, size in enumerate([(40, 40), (50, 30), (20, 25), (300, 200),
                                                                   (40, 40), (64, 48)])]
    images.append(image_bytes(9, mode="L"))
    pixels, ok, errors = DeviceImages(tiny_preprocess, torch.device("cpu")).decode(images)
    assert errors == {} and ok.tolist() == list(range(len(images)))
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (len(images), 3, 32, 32)
    pre = Preprocessor(tiny_preprocess)
    cpu = np.stack([pre(_load_image(b, InputConfig())) for b in images]).astype(int)
    diff = np.abs(pixels.numpy().astype(int) - cpu)
    assert diff.max() <= 3 and diff.mean() < 0.3


def test_one_bad_jpeg_fails_alone(tiny_preprocess):
    import torch

    images = [image_bytes(0), _corrupt_jpeg(1), image_bytes(2), b""]
    pixels, ok, errors = DeviceImages(tiny_preprocess, torch.device("cpu")).decode(images)
    assert ok.tolist() == [0, 2] and tuple(pixels.shape) == (2, 3, 32, 32)
    assert set(errors) == {1, 3}
    assert "could not be decoded" in errors[1] and "truncated" in errors[1] and ".cpp" not in errors[1]
    assert "empty" in errors[3]


def test_job_config_key_becomes_the_flag():

    from jobs._config import config_argv

    argv = config_argv("score", {"input": ["a.tar"], "stats": "s", "output": "o", "decode": "gpu"})
    assert argv[argv.index("--decode") + 1] == "gpu"


# -- end to end: `wclip fit` / `wclip score` with real Ray, tar shards and Parquet ------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _cli(*argv):
    from pipeline.cli import main

    assert main(list(argv)) == 0


@pytest.fixture(scope="module", params=DEVICES)
def both_paths(request, tmp_path_factory, ray_local):
    """Fit on a clean shard with --decode gpu, then score a clean and a mixed shard with each decode."""
    device = request.param
    folder = tmp_path_factory.mktemp(f"decode-{device}")
    urls = clean_shards(folder, shards=1, per_shard=40)
    urls.append(write_shard(folder / "00001.tar", mixed_samples()))
    stats = str(folder / "stats.safetensors")
    common = ["--device", device, "--precision", "fp32", "--chunk-size", str(CHUNK), "--no-progress"]
    _cli("fit", "--input", urls[0], "--output", stats, "--model", "wclip-tiny", "--random-init",
         "--components", "16", "--decode", "gpu", *common)
    out = {}
    for decode in ("cpu", "gpu"):
        out[decode] = folder / f"scores-{decode}"
        _cli("score", "--input", *urls, "--stats", stats, "--output", str(out[decode]), "--decode", decode,
             "--save-embeddings", *common)
    return device, stats, out


def _load(folder, name):
    """A shard's scores and its saved embeddings (clip-retrieval's layout, numbered by the shard's name)."""
    root = state(folder) / "embeddings"
    embeddings = {"image": np.load(root / "img_emb" / f"img_emb_{name}.npy"),
                  "text": np.load(root / "text_emb" / f"text_emb_{name}.npy")}
    return pq.read_table(folder / f"{name}.parquet"), embeddings


def test_fit_records_the_decode_place(both_paths):
    _, stats, _ = both_paths
    meta = StatsFile.load(stats).metadata
    assert meta["decode"] == "gpu" and meta["n_reference"] == 40


@pytest.mark.parametrize("name", ["00000", "00001"])
def test_gpu_decode_gives_the_cpu_rows(both_paths, name):
    device, stats_path, out = both_paths
    (a, emb_a), (b, emb_b) = _load(out["cpu"], name), _load(out["gpu"], name)
    assert a.schema == b.schema and a.num_rows == b.num_rows == (40 if name == "00000" else 24)
    for col in ("key", "index", "shard", "url", "uid", "caption", "status"):
        assert a[col].to_pylist() == b[col].to_pylist(), col
    # The text tower does not see the decode at all.
    for col in ("text_sqnorm", "text_loglik", "text_pvalue"):
        np.testing.assert_array_equal(a[col].to_numpy(zero_copy_only=False), b[col].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(emb_a["text"], emb_b["text"])

    ok = np.array([s == "ok" for s in a["status"].to_pylist()])
    ia, ib = emb_a["image"][ok], emb_b["image"][ok]
    assert np.isfinite(ia).all() and np.isfinite(ib).all()
    # The pixels differ by at most 3 levels of 255 (torch's float resize vs PIL's fixed-point one; on CUDA
    # also nvJPEG's IDCT). Measured on CPU: image embeddings within 1.0e-3 relative (cosine >= 0.9999996),
    # clip_score within 2.3e-4, image_loglik within 0.87 nats = 2.5% relative. The loglik moves much more
    # than the embeddings because whitening divides by the square roots of the smallest kept eigenvalues,
    # and this reference set (36 near-identical gradient images, 16 components) has a tiny spread: the
    # embedding change is ~1% of the embeddings' spread around their mean. The CUDA bounds are guesses
    # (twice to five times the CPU ones), not yet measured.
    rel = np.linalg.norm(ia - ib, axis=1) / np.linalg.norm(ia, axis=1)
    la, lb = (t["image_loglik"].to_numpy(zero_copy_only=False)[ok] for t in (a, b))
    ca, cb = (t["clip_score"].to_numpy(zero_copy_only=False)[ok] for t in (a, b))
    print(f"\n{device} {name}: image embedding rel diff max {rel.max():.2e}; image_loglik |diff| max "
          f"{np.abs(la - lb).max():.3f} (rel {(np.abs(la - lb) / np.abs(la)).max():.2e}); "
          f"clip_score |diff| max {np.abs(ca - cb).max():.2e}")
    scale = 1 if device == "cpu" else 5
    assert rel.max() <= 2e-3 * scale
    np.testing.assert_allclose(lb, la, rtol=0.05 * scale)
    np.testing.assert_allclose(cb, ca, atol=1e-3 * scale)
    # Every ok row of the device path is scored from its own embedding, nothing shifted between rows.
    stats = StatsFile.load(stats_path)
    np.testing.assert_allclose(stats.towers["image"].loglik(ib.astype(np.float64)), lb, rtol=1e-5)


def test_bad_images_are_decode_rows_and_their_neighbours_are_scored(both_paths):
    _, _, out = both_paths
    rows = {d: _load(out[d], "00001")[0].to_pylist() for d in ("cpu", "gpu")}
    for decode, table in rows.items():
        assert {r["index"] for r in table if r["status"] != "ok"} == BAD, decode
        for r in table:
            if r["index"] in BAD:
                assert r["status"] == "decode" and r["image_loglik"] is None and r["clip_score"] is None
                assert r["text_loglik"] is not None  # the caption is still scored
            else:
                assert r["error"] is None and np.isfinite([r["image_loglik"], r["clip_score"]]).all()
    gpu = {r["index"]: r for r in rows["gpu"]}
    for i in (3, 12):  # header fine, data truncated: found by the device decoder, one row each
        assert gpu[i]["error"].startswith("image (JPEG) could not be decoded (torchvision decode_jpeg")
        assert "truncated" in gpu[i]["error"]
    cpu = {r["index"]: r for r in rows["cpu"]}
    for i in (11, 13):  # never reached the device: the reader's own message, as with --decode cpu
        assert gpu[i]["error"] == cpu[i]["error"] and ".jpg" in gpu[i]["error"]
    record = marker(out["gpu"], "00001")
    assert record["status_counts"] == {"decode": len(BAD), "ok": 24 - len(BAD)}


def test_png_webp_grayscale_and_cmyk_are_scored(both_paths):
    _, _, out = both_paths
    (_, emb_a), (b, emb_b) = _load(out["cpu"], "00001"), _load(out["gpu"], "00001")
    table = {r["index"]: r for r in b.to_pylist()}
    for i in (5, 7, 9, 19):  # PNG, grayscale JPEG, CMYK JPEG, WebP
        assert table[i]["status"] == "ok" and np.isfinite(table[i]["image_loglik"])
    # PNG and WebP are decoded by the readers in both modes: the same pixels, the same embeddings
    # (up to float summation order: the chunk's images are batched in another order).
    np.testing.assert_allclose(emb_b["image"][[5, 19]], emb_a["image"][[5, 19]], rtol=1e-5, atol=1e-6)
