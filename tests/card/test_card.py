"""wclip card: quantile sketch bound, streaming summaries, README/YAML, plots, card.json."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.card.build import build_card
from pipeline.card.measure import error_kind
from pipeline.card.render import size_category
from pipeline.card.sketch import Extremes, Histogram, QuantileSketch
from pipeline.config import CardConfig

SCORES = ("image_sqnorm", "image_loglik", "image_pvalue", "text_sqnorm", "text_loglik",
          "text_pvalue", "clip_score")
PNG = b"\x89PNG\r\n\x1a\n"


# ---- sketch ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel_err", [0.01, 0.001])
def test_quantile_sketch_relative_error_bound_and_merge(rel_err):
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(-400, 40, 20_000), rng.lognormal(0, 4, 5_000), np.zeros(30),
                        -rng.lognormal(-2, 1, 3_000), rng.chisquare(3, 4_000), [1e-15, -1e-15]])
    rng.shuffle(x)
    whole, a, b = QuantileSketch(rel_err), QuantileSketch(rel_err), QuantileSketch(rel_err)
    for part in np.array_split(x, 17):
        whole.update(part)
    a.update(x[:10_000])
    b.update(np.append(x[10_000:], [np.nan, np.inf]))        # ignored
    a.merge(b)
    exact = np.sort(x)
    for q in np.linspace(0, 1, 2001):
        truth = exact[math.floor(q * (x.size - 1))]
        bound = rel_err * abs(truth) * (1 + 1e-9) + whole.min_value
        assert abs(whole.quantile(q) - truth) <= bound, q
        assert a.quantile(q) == whole.quantile(q)
    assert whole.count == a.count == x.size and whole.mean == pytest.approx(x.mean())
    # the bound is tight enough to matter: a coarser sketch breaks the finer bound somewhere
    coarse = QuantileSketch(rel_err * 20)
    coarse.update(x)
    assert any(abs(coarse.quantile(q) - exact[math.floor(q * (x.size - 1))]) >
               rel_err * abs(exact[math.floor(q * (x.size - 1))]) for q in np.linspace(0.01, 0.99, 99))


def test_histogram_and_extremes_match_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=5000)
    h, e = Histogram(-2, 2, 40), Extremes(5)
    for i, part in enumerate(np.array_split(x, 7)):
        h.update(part)
        e.update(part, lambda j, i=i: {"batch": i, "row": j})
    assert h.counts.tolist() == np.histogram(x, np.linspace(-2, 2, 41))[0].tolist()
    assert (h.below, h.above) == (int((x < -2).sum()), int((x > 2).sum()))
    assert [v for v, _ in e.low] == np.sort(x)[:5].tolist()
    assert [v for v, _ in e.high] == np.sort(x)[::-1][:5].tolist()


def test_labels():
    assert error_kind("UnidentifiedImageError: cannot identify image 0x7f12") == "UnidentifiedImageError"
    assert error_kind("image has 90000000 pixels") == "image has # pixels"
    assert [size_category(n) for n in (5, 5_000, 2_000_000_000)] == ["n<1K", "1K<n<10K", "1B<n<10B"]


# ---- end to end ------------------------------------------------------------------------------------
def _jpeg(rng) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two readable shards, one score file whose shard is gone, a stats file and a filter."""
    from pipeline.config import FilterConfig
    from pipeline.curate.filter import Condition, run_filter
    from pipeline.whitening import StatsFile, WhiteningStats

    root = tmp_path_factory.mktemp("card")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    (root / "scores").mkdir()
    rows = []
    for s in range(3):
        url = str(root / "data" / f"{s:05d}.tar")
        cols = {c: [] for c in ("key", "shard", "index", "caption", "uid", "status", "error", *SCORES)}
        with tarfile.open(url, "w") as tar:
            for i in range(40):
                key = f"{s}{i:04d}"
                for ext, data in (("jpg", _jpeg(rng)), ("txt", f"a photo {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                status = "ok" if i % 9 else ("decode" if s else "read")
                sq = float(rng.chisquare(8)) if status == "ok" else None
                row = dict(key=key, shard=url, index=i, caption=f"a photo {key}", uid=rng.bytes(16).hex(),
                           status=status, error=None if status == "ok" else
                           f"UnidentifiedImageError: cannot identify image file {i}",
                           image_sqnorm=sq, image_loglik=None if sq is None else -0.5 * (8 * 1.8379 + sq),
                           image_pvalue=None if sq is None else float(rng.random()),
                           text_sqnorm=None if sq is None else float(rng.chisquare(8)),
                           text_loglik=None if sq is None else float(-rng.chisquare(8)),
                           text_pvalue=None if sq is None else float(rng.random()),
                           clip_score=None if sq is None else float(rng.normal(0.3, 0.05)))
                for c in cols:
                    cols[c].append(row[c])
                rows.append(row)
        schema = pa.schema([(c, pa.int32() if c == "index" else pa.float32() if c in SCORES
                             else pa.string()) for c in cols])
        pq.write_table(pa.table(cols, schema=schema), root / "scores" / f"{s:05d}.parquet",
                       row_group_size=16)
    (root / "data" / "00002.tar").unlink()                     # scored, then gone
    towers = {t: WhiteningStats.fit(rng.normal(size=(300, 8)) * np.linspace(3, 0.5, 8), holdout=0.3)
              for t in ("image", "text")}
    StatsFile(towers=towers, metadata={"model": "wclip-demo", "pretrained": None, "normalize": False,
                                       "reference_digest": "abc123", "n_reference": 300}
              ).save(root / "stats.safetensors")
    run_filter(FilterConfig(str(root / "scores"), str(root / "filtered"),
                            (Condition.parse("fraction", "clip_score=0.5"),)))
    return root, rows


def test_card_files_numbers_and_plots(corpus):
    root, rows = corpus
    card = build_card(CardConfig(str(root / "scores"), str(root / "stats.safetensors"), str(root / "card"),
                                 filter_dir=str(root / "filtered"), extremes=4))
    text = (root / "card" / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["license"] == "unknown" and {"wclip", "whitened-clip"} <= set(header["tags"])
    assert header["size_categories"] == ["n<1K"] and "wclip-demo" in header["pretty_name"]
    assert header["task_categories"]
    for section in ("## Provenance", "## Counts", "## Score quantiles", "## Filter",
                    "## Normality diagnostics", "## Method", "arXiv:2505.06934", "abc123"):
        assert section in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 6
    from PIL import Image
    for name in images:
        data = (root / "card" / name).read_bytes()
        assert data[:8] == PNG
        with Image.open(root / "card" / name) as im:
            im.verify()

    assert json.loads((root / "card" / "card.json").read_text()) == card
    ok = [r for r in rows if r["status"] == "ok"]
    assert card["rows"] == 120 and card["status_counts"] == {
        "ok": len(ok), "read": sum(r["status"] == "read" for r in rows),
        "decode": sum(r["status"] == "decode" for r in rows)}
    assert {(e["status"], e["kind"]) for e in card["error_kinds"]} == \
        {("read", "UnidentifiedImageError"), ("decode", "UnidentifiedImageError")}
    for column in SCORES:
        values = np.sort(np.array([r[column] for r in ok], np.float32).astype(np.float64))
        for label, got in card["quantiles"][column]["q"].items():
            truth = values[math.floor(float(label[:-1]) / 100 * (values.size - 1))]
            assert abs(got - truth) <= 0.001 * abs(truth) * (1 + 1e-9) + 1e-12, (column, label)
    by_ll = sorted(ok, key=lambda r: np.float32(r["image_loglik"]))
    assert [r["key"] for r in card["extremes"]["least_likely"]] == [r["key"] for r in by_ll[:4]]
    assert [r["key"] for r in card["extremes"]["most_likely"]] == [r["key"] for r in by_ll[::-1][:4]]
    hist = card["histograms"]["image_loglik"]
    assert sum(hist["counts"]) + hist["below"] + hist["above"] == len(ok)

    from pipeline.whitening import StatsFile
    summary = StatsFile.load(root / "stats.safetensors").towers["image"].summary()
    assert card["normality"]["image"]["heldout"]["anderson_darling"] == \
        summary["normality_heldout"]["anderson_darling"]
    assert card["provenance"]["towers"]["image"]["components"] == 8
    filtered = json.loads((root / "filtered" / "filter.json").read_text())
    assert card["filter"]["kept"] == filtered["kept"] and f"Kept {filtered['kept']}" in text
    # the vanished shard gives placeholders and a note, the readable ones real thumbnails
    lost = [r for r in card["extremes"]["least_likely"] + card["extremes"]["most_likely"]
            if r["shard"].endswith("00002.tar")]
    assert bool(lost) == any("00002.tar" in n for n in card["notes"])


def test_thumbnails_from_input_mapping_and_placeholders(corpus):
    from pipeline.card.plots import thumbnails

    root, rows = corpus
    moved = root / "moved"
    moved.mkdir(exist_ok=True)
    (root / "data" / "00000.tar").rename(moved / "00000.tar")
    try:
        wanted = [rows[1], rows[2], rows[100]]             # two from shard 0, one from the lost shard
        thumbs, notes = thumbnails(wanted)
        assert thumbs == [None, None, None] and len(notes) == 1 and "2 shard(s)" in notes[0]
        thumbs, notes = thumbnails(wanted, (str(moved / "00000.tar"),))
        assert thumbs[0] is not None and thumbs[0].size == (32, 24) and thumbs[2] is None
        assert len(notes) == 1 and "00002" in notes[0]
    finally:
        (moved / "00000.tar").rename(root / "data" / "00000.tar")


def test_cli_card(corpus, capsys):
    from pipeline.cli import main

    root, _ = corpus
    assert main(["card", "--scores", str(root / "filtered" / "kept"), "--stats",
                 str(root / "stats.safetensors"), "--output", str(root / "card2"),
                 "--no-thumbnails"]) == 0
    card = json.loads((root / "card2" / "card.json").read_text())
    assert card["status_counts"] == {"ok": json.loads((root / "filtered" / "filter.json").read_text())["kept"]}
    assert main(["card", "--scores", str(root / "scores"), "--stats", str(root / "nope"),
                 "--output", str(root / "card3")]) == 2
    assert "does not exist" in capsys.readouterr().err
