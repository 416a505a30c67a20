"""wclip card with the local likelihood (stats fitted with clusters): the local columns are measured, each
clustered tower gets a section (K, shrinkage, reference and corpus sizes, the lowest-local-likelihood rows
per cluster, streamed), a cluster-size plot; a card without clusters has none of it."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.card.build import build_card
from pipeline.card.measure import CLUSTER_EXAMPLES, HISTOGRAM_COLUMNS
from pipeline.card.sketch import GroupedLowest
from pipeline.config import CardConfig
from pipeline.scores.table import LOCAL_SCORE_COLUMNS, SCORE_COLUMNS, scores_schema
from pipeline.storage import sha256

K = 3
PNG = b"\x89PNG\r\n\x1a\n"


def test_grouped_lowest_matches_sorting_and_stays_bounded():
    rng = np.random.default_rng(3)
    n, k = 4000, 4
    groups = rng.integers(-1, 7, n).astype(np.float64)       # -1 and 6 lie outside 0..5
    groups[rng.random(n) < 0.1] = np.nan                      # no group: not counted
    values = np.round(rng.normal(size=n), 1)                  # many ties: the row seen first wins
    values[rng.random(n) < 0.05] = np.nan                     # counted, never listed
    tally = GroupedLowest(6, k)
    for part in np.array_split(np.arange(n), 23):
        tally.update(groups[part], values[part], lambda i, part=part: {"row": int(part[i])})
        assert all(len(low) <= k for low in tally.low)
    for j in range(6):
        members = np.flatnonzero(groups == j)
        assert tally.counts[j] == members.size
        ranked = sorted((v, i) for i, v in zip(members, values[members]) if np.isfinite(v))[:k]
        assert [(v, r["row"]) for v, r in tally.low[j]] == [(v, int(i)) for v, i in ranked]
    assert tally.outside == int(np.isin(groups, (-1, 6)).sum())


def made(stats) -> dict:
    return {"format": "wclip-scores/2", "stats_digest": sha256(stats), "stats_path": str(stats),
            "model": {"model": "wclip-demo", "weights": "builtin"}, "normalize": False}


def write_corpus(root, local: bool, stats, seed=0):
    """Three score files (``local``: with the local likelihood's columns) made by ``stats``; returns the rows."""
    rng = np.random.default_rng(seed)
    schema = scores_schema(local)
    schema = schema.with_metadata({b"wclip": json.dumps(made(stats)).encode()})
    (root / "scores").mkdir()
    rows = []
    for s in range(3):
        part = []
        for i in range(70):
            ok = i % 13 != 6
            row = dict(key=f"{s}-{i:03d}", shard=f"/gone/{s:05d}.tar", index=i, url=f"http://x/{s}/{i}",
                       uid=None, caption=f"caption | {s} {i}", status="ok" if ok else "decode",
                       error=None if ok else "bad image")
            for c in SCORE_COLUMNS:
                row[c] = float(np.float32(rng.normal(-50, 5))) if ok else None
            for t in ("image", "text"):
                scored = ok or t == "text"                    # a failed image still has its caption scored
                row[f"{t}_cluster"] = int(rng.choice(K, p=[0.6, 0.3, 0.1])) if scored else None
                row[f"{t}_local_loglik"] = float(np.float32(rng.normal(-40, 8))) if scored else None
                row[f"{t}_local_pvalue"] = float(np.float32(rng.random())) if scored else None
            if i == 9:
                row["image_local_loglik"] = None              # counted in its cluster, never listed
            part.append(row)
        table = pa.table({f.name: [r.get(f.name) for r in part] for f in schema}, schema=schema)
        pq.write_table(table, root / "scores" / f"{s:05d}.parquet", row_group_size=16)
        rows += part
    return rows


def write_stats(path, clusters):
    from pipeline.whitening import StatsFile, WhiteningStats

    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(size=(n, 6)) + c for n, c in ((150, 0), (80, 4), (40, -4))])
    towers = {t: WhiteningStats.fit(X, holdout=0.3, clusters=clusters) for t in ("image", "text")}
    StatsFile(towers=towers, metadata={"model": "wclip-demo", "normalize": False}).save(path)
    return StatsFile.load(path)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    root = tmp_path_factory.mktemp("clustered")
    sf = write_stats(root / "stats.safetensors", K)
    rows = write_corpus(root, True, root / "stats.safetensors")
    card = build_card(CardConfig(str(root / "scores"), str(root / "stats.safetensors"), str(root / "card"),
                                 extremes=4, thumbnails=False))
    return root, sf, rows, card


def test_cluster_section_sizes_and_lowest_rows(clustered):
    root, sf, rows, card = clustered
    assert json.loads((root / "card" / "card.json").read_text()) == card
    ok = [r for r in rows if r["status"] == "ok"]
    for tower in ("image", "text"):
        info, section = sf.towers[tower].clusters.summary(), card["clusters"][tower]
        assert (section["k"], section["shrinkage"]) == (K, info["shrinkage"])
        assert section["reference_rows"] == sum(info["sizes"]) and section["outside"] == 0
        counts = Counter(r[f"{tower}_cluster"] for r in ok)
        assert section["corpus_rows"] == len(ok)
        for j, entry in enumerate(section["clusters"]):
            assert entry["cluster"] == j
            assert (entry["reference_weight"], entry["reference_rows"], entry["heldout_rows"]) == \
                (info["weights"][j], info["sizes"][j], info["calibration_counts"][j])
            assert entry["pvalue_floor"] == 1 / (info["calibration_counts"][j] + 1)
            assert entry["corpus_rows"] == counts[j] and entry["corpus_share"] == counts[j] / len(ok)
            assert entry["corpus_over_reference"] == pytest.approx(counts[j] / len(ok) / info["weights"][j])
            members = sorted((r for r in ok if r[f"{tower}_cluster"] == j and r[f"{tower}_local_loglik"] is not None),
                             key=lambda r: r[f"{tower}_local_loglik"])[:CLUSTER_EXAMPLES]
            assert [e["key"] for e in entry["lowest"]] == [r["key"] for r in members]
            assert [(e["local_loglik"], e["local_pvalue"], e["caption"], e["url"]) for e in entry["lowest"]] == \
                [(r[f"{tower}_local_loglik"], r[f"{tower}_local_pvalue"], r["caption"], r["url"]) for r in members]


def test_local_columns_measured_plotted_and_rendered(clustered):
    root, sf, rows, card = clustered
    assert list(card["quantiles"]) == list(SCORE_COLUMNS + LOCAL_SCORE_COLUMNS)
    ok = [r for r in rows if r["status"] == "ok"]
    values = np.sort([r["image_local_loglik"] for r in ok if r["image_local_loglik"] is not None])
    assert card["quantiles"]["image_local_loglik"]["count"] == values.size
    assert card["quantiles"]["image_local_loglik"]["min"] == values[0]
    assert {"image_local_loglik", "text_local_loglik"} <= set(card["histograms"])
    assert sum(card["histograms"]["text_local_loglik"]["counts"]) + card["histograms"]["text_local_loglik"]["below"] \
        + card["histograms"]["text_local_loglik"]["above"] == len(ok)
    assert card["plots"]["cluster_sizes"] == "cluster_sizes.png"
    text = (root / "card" / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "cluster_sizes.png" in images and len(images) == 7
    for name in images:
        assert (root / "card" / name).read_bytes()[:8] == PNG
    section = text.split("## Clusters (local likelihood)")[1].split("## Filter")[0]
    assert "### image tower: 3 clusters" in section and "### text tower: 3 clusters" in section
    for entry in card["clusters"]["image"]["clusters"]:
        assert f"| {entry['cluster']} | {entry['reference_rows']:,} |" in section
        for e in entry["lowest"]:
            assert f"| {entry['cluster']} | {e['key']} | caption \\| " in section   # table-safe caption
    assert "| image_local_pvalue |" in text                                       # the quantiles table


def test_a_card_without_clusters_has_none_of_it(tmp_path):
    write_stats(tmp_path / "stats.safetensors", None)
    write_corpus(tmp_path, False, tmp_path / "stats.safetensors")
    card = build_card(CardConfig(str(tmp_path / "scores"), str(tmp_path / "stats.safetensors"),
                                 str(tmp_path / "card"), extremes=4, thumbnails=False))
    assert list(card) == ["version", "created", "scores", "score_files", "stats", "rows", "status_counts",
                          "error_kinds", "provenance", "normality", "quantiles", "quantile_error", "histograms",
                          "extremes", "filter", "hub", "citation", "plots", "notes"]
    assert list(card["quantiles"]) == list(SCORE_COLUMNS)
    assert list(card["histograms"]) == list(HISTOGRAM_COLUMNS) and "cluster_sizes" not in card["plots"]
    text = (tmp_path / "card" / "README.md").read_text()
    assert "Clusters" not in text and "_local_" not in text
    assert sorted(p.name for p in (tmp_path / "card").glob("*.png")) == sorted(card["plots"].values())


def test_clustered_stats_over_scores_without_local_columns(tmp_path):
    write_stats(tmp_path / "stats.safetensors", K)
    write_corpus(tmp_path, False, tmp_path / "stats.safetensors")
    card = build_card(CardConfig(str(tmp_path / "scores"), str(tmp_path / "stats.safetensors"),
                                 str(tmp_path / "card"), extremes=4, thumbnails=False))
    section = card["clusters"]["image"]
    assert section["k"] == K and section["corpus_rows"] is None
    assert all(e["corpus_rows"] is None and e["lowest"] == [] for e in section["clusters"])
    assert any("no image_cluster column" in n for n in card["notes"])
    assert list(card["quantiles"]) == list(SCORE_COLUMNS)


HOSTILE = ["![x](http://evil.example/pixel.png) <img src=x onerror=alert(1)>",
           "line one\nline two | cell [link](https://evil.example) <script>alert(1)</script>",
           "`code` *bold* &lt;b&gt; www.evil.example \\| end"]


def test_hostile_captions_keys_and_urls_render_as_text(tmp_path):
    """Issue #26 (12): a caption holding Markdown image syntax rendered as an image in the card (a remote fetch
    when the card is viewed). Every user string in the README is text: no image, link, HTML or broken row."""
    from markdown_it import MarkdownIt

    from pipeline.card.markdown import text

    write_stats(tmp_path / "stats.safetensors", K)
    write_corpus(tmp_path, True, tmp_path / "stats.safetensors")
    for path in sorted((tmp_path / "scores").glob("*.parquet")):
        table = pq.read_table(path)
        n = table.num_rows
        hostile = {"caption": [HOSTILE[i % 3] for i in range(n)], "url": [HOSTILE[(i + 1) % 3] for i in range(n)],
                   "key": [f"{HOSTILE[(i + 2) % 3]} {i}" for i in range(n)],
                   "error": [None if e is None else "![e](http://evil.example/e.png)"
                             for e in table["error"].to_pylist()]}
        for name, values in hostile.items():
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
        pq.write_table(table.replace_schema_metadata(table.schema.metadata), path)
    card = build_card(CardConfig(str(tmp_path / "scores"), str(tmp_path / "stats.safetensors"), str(tmp_path / "card"),
                                 extremes=4, thumbnails=False))
    readme = (tmp_path / "card" / "README.md").read_text()
    section = readme.split("## Clusters (local likelihood)")[1].split("## Filter")[0]
    listed = [e for entry in card["clusters"]["image"]["clusters"] for e in entry["lowest"]]
    assert listed and all(e["caption"] in HOSTILE for e in listed)          # card.json keeps the data as it was
    for e in listed:
        assert f"| {text(e['key'])} | {text(e['caption'])} |" in section
    html = MarkdownIt("commonmark").enable("table").render(readme)
    assert "evil.example" in html and "alert(1)" in html                    # shown...
    images = re.findall(r"<img [^>]*>", html)                               # ...but only the card's own plots
    assert images and all(re.fullmatch(r'<img src="[a-z_]+\.png" alt="[^"]*" />', i) for i in images), images
    assert "<a " not in html and "<script" not in html and "&lt;script&gt;alert(1)" in html
    assert "://" not in readme.replace("arXiv", "").split("## Clusters")[1].split("## Method")[0]  # no bare URL
    # every table row keeps its cells: a caption's newline or pipe does not end or split it
    lowest = [line for line in section.splitlines() if line.startswith("| ") and "evil" in line]
    assert lowest and all(len(re.findall(r"(?<!\\)\|", line)) == 7 for line in lowest)
    assert text("a\nb\r\tc|d") == "a b c\\|d" and text("<b>&") == "&lt;b&gt;&amp;"
    assert text("see https://x.example or www.y.example") == "see https:\\/\\/x.example or www\\.y.example"
