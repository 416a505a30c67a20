"""wclip filter on the local likelihood's columns (scores of stats fitted with --clusters K): thresholds and
fractions keep the right rows, a cluster is selected by its number, the new shards' metadata carries the
columns, and scores without them are refused before any work with a one-line message."""

from __future__ import annotations

import io
import math
import tarfile
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import FilterConfig
from pipeline.curate.filter import Condition, run_filter
from pipeline.curate.img2dataset import LOCAL_META_SCHEMA, META_SCHEMA
from pipeline.executors.local import map_on_threads
from pipeline.scores.table import LOCAL_COLUMNS, SCORE_COLUMNS, scores_schema

K = 3


def build(root, local=True, n_shards=3, per_shard=30, seed=0):
    """Tar shards and their score files (``local``: with the local likelihood's columns, as `wclip score`
    writes them for clustered stats); returns (shard paths, scores folder, rows as dicts)."""
    rng = np.random.default_rng(seed)
    (root / "data").mkdir()
    (root / "scores").mkdir()
    schema = scores_schema(local)
    urls, rows = [], []
    for s in range(n_shards):
        url = str(root / "data" / f"{s:05d}.tar")
        shard_rows = []
        with tarfile.open(url, "w") as tar:
            for i in range(per_shard):
                key = f"{s:02d}{i:04d}"
                for ext, data in (("jpg", rng.bytes(int(rng.integers(10, 300)))), ("txt", f"cap {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
                ok = i % 11 != 4
                row = dict(key=key, shard=url, index=i, url=f"http://x/{key}", uid=rng.bytes(16).hex(),
                           caption=f"cap {key}", status="ok" if ok else "decode", error=None if ok else "bad")
                for c in SCORE_COLUMNS:
                    row[c] = float(np.float32(rng.normal())) if ok else None
                for t in ("image", "text"):
                    scored = ok or t == "text"        # a failed image still has its caption scored
                    row[f"{t}_cluster"] = int(rng.integers(K)) if scored else None
                    row[f"{t}_local_loglik"] = float(np.float32(rng.normal(-80, 10))) if scored else None
                    row[f"{t}_local_pvalue"] = float(np.float32(rng.random())) if scored else None
                if i == 7:
                    row["image_local_loglik"] = None   # an ok row without a value fails its conditions
                shard_rows.append(row)
        table = pa.table({f.name: [r.get(f.name) for r in shard_rows] for f in schema}, schema=schema)
        pq.write_table(table, root / "scores" / f"{s:05d}.parquet", row_group_size=8)
        urls.append(url)
        rows += shard_rows
    return urls, root / "scores", rows


def kept_table(out):
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "kept").glob("*.parquet")))


def test_fractions_and_thresholds_on_local_columns_keep_the_right_rows(tmp_path):
    _, scores, rows = build(tmp_path)
    report = run_filter(FilterConfig(str(scores), str(tmp_path / "out"), (
        Condition.parse("fraction", "image_local_loglik=0.4"), Condition.parse("max", "text_local_pvalue=0.8"),
        Condition.parse("min", "image_local_pvalue=0.1"))))

    ok = [r for r in rows if r["status"] == "ok"]
    ranked = sorted((r["image_local_loglik"] for r in ok if r["image_local_loglik"] is not None), reverse=True)
    k = math.ceil(Fraction(4, 10) * len(ranked))
    threshold = ranked[k - 1]
    expected = [r["key"] for r in ok if r["image_local_loglik"] is not None and r["image_local_loglik"] >= threshold
                and r["text_local_pvalue"] <= 0.8 and r["image_local_pvalue"] >= 0.1]
    table = kept_table(tmp_path / "out")
    assert table.column("key").to_pylist() == expected and report["kept"] == len(expected) > 0
    fraction = report["conditions"][0]
    assert fraction["threshold"] == threshold and fraction["keep"] == "highest"
    assert (fraction["rank"], fraction["ranked"]) == (k, len(ranked)) and fraction["passed"] == k
    # the kept rows are the score rows, local columns included, value for value
    by_key = {r["key"]: r for r in rows}
    for c in LOCAL_COLUMNS:
        assert table.column(c).to_pylist() == [by_key[key][c] for key in expected], c
    assert table.schema.field("image_cluster").type == pa.int32()

    # the lowest direction: the least likely under the mixture (outliers of their clusters)
    run_filter(FilterConfig(str(scores), str(tmp_path / "low"), (Condition.parse("fraction",
                                                                                  "image_local_loglik:lowest=0.1"),)))
    low = kept_table(tmp_path / "low").column("image_local_loglik").to_pylist()
    assert sorted(low) == sorted(ranked)[: math.ceil(Fraction(1, 10) * len(ranked))]


def test_a_cluster_is_selected_by_its_number_not_by_a_fraction(tmp_path):
    _, scores, rows = build(tmp_path)
    run_filter(FilterConfig(str(scores), str(tmp_path / "out"), (
        Condition.parse("min", "text_cluster=1"), Condition.parse("max", "text_cluster=1")), include_failed=True))
    assert kept_table(tmp_path / "out").column("key").to_pylist() == \
        [r["key"] for r in rows if r["text_cluster"] == 1]
    with pytest.raises(ValueError, match="cluster number, not a score"):
        Condition.parse("fraction", "image_cluster=0.5")


def test_new_shards_carry_the_local_columns(tmp_path):
    urls, scores, rows = build(tmp_path)
    cfg = FilterConfig(str(scores), str(tmp_path / "out"), (Condition.parse("fraction", "text_local_loglik=0.6"),),
                       inputs=tuple(urls), samples_per_shard=7, samples_per_task=10, progress=False)
    report = run_filter(cfg, mapper=map_on_threads)
    assert report["shards"]["assembled"] > 0 and not report["shards"]["failed"]   # pieces were joined too
    shards = sorted((tmp_path / "out" / "shards").glob("*.parquet"))
    meta = pa.concat_tables(pq.read_table(p) for p in shards)
    assert all(pq.read_schema(p).names == LOCAL_META_SCHEMA.names for p in shards)
    assert meta.schema.field("image_cluster").type == pa.int32()
    kept = kept_table(tmp_path / "out")
    assert meta.column("key").to_pylist() == kept.column("key").to_pylist()
    for c in SCORE_COLUMNS + LOCAL_COLUMNS:
        assert meta.column(c).to_pylist() == kept.column(c).to_pylist(), c


def test_scores_without_local_columns_are_refused_and_keep_their_layout(tmp_path, capsys):
    urls, scores, rows = build(tmp_path, local=False)
    for flag, text in (("--keep-fraction", "image_local_loglik=0.9"), ("--min", "text_local_pvalue=0.01"),
                       ("--max", "image_cluster=2")):
        for extra in ([], ["--dry-run"]):
            assert main(["filter", "--scores", str(scores), "--output", str(tmp_path / "out"), flag, text,
                         *extra]) == 2
            err = capsys.readouterr().err.strip()
            column = text.split("=")[0]
            assert len(err.splitlines()) == 1 and f"no column {column!r}" in err
            assert "wclip fit --clusters K" in err
            assert not (tmp_path / "out").exists()     # refused before any work
    # an unclustered folder's new shards keep the layout they always had: no empty local columns
    run_filter(FilterConfig(str(scores), str(tmp_path / "plain"), (Condition.parse("fraction", "clip_score=0.5"),),
                            inputs=tuple(urls), samples_per_shard=7, samples_per_task=10, progress=False),
               mapper=map_on_threads)
    shards = sorted((tmp_path / "plain" / "shards").glob("*.parquet"))
    assert shards and all(pq.read_schema(p).names == META_SCHEMA.names for p in shards)
    assert not set(LOCAL_COLUMNS) & set(kept_table(tmp_path / "plain").schema.names)
