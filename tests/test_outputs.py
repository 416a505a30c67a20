"""The scores folder contract: only score Parquet files in it, provenance in every output, a resume that
never mixes two fits or models and never trusts a marker whose output is gone, and no file of another tool
ever touched (real Ray, real tar shards, real Parquet, a loopback HTTP server)."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardkit import clean_shards, cut_transfer, http_server, marker, marker_files, state, tiny_run, write_shard

from pipeline.config import FitConfig, ScoreConfig
from pipeline.errors import ConfigError
from pipeline.models import ModelSpec
from pipeline.runs.fit import fit
from pipeline.runs.score import score
from pipeline.whitening import StatsFile


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local):
    """Two stats files of the same model (two fits) and one of another model, and three target shards."""
    folder = tmp_path_factory.mktemp("outputs")
    ref = clean_shards(folder / "ref", shards=2, per_shard=30, start=5000)
    stats = {}
    for name, seed, model_seed in (("a", 0, 0), ("b", 1, 0), ("other_model", 0, 1)):
        path = str(folder / f"{name}.safetensors")
        run = tiny_run(ref, model=ModelSpec("wclip-tiny", random_init=True, seed=model_seed))
        fit(FitConfig(run=run, output=path, components=8, holdout=0.2, seed=seed))
        stats[name] = path
    targets = clean_shards(folder / "target", shards=3, per_shard=12)
    return folder, stats, targets


def _score(stats_path, urls, out, model_seed=0, retries=2, **kw):
    run = tiny_run(urls, model=ModelSpec("wclip-tiny", random_init=True, seed=model_seed), retries=retries)
    return score(ScoreConfig(run=run, stats_path=stats_path, output=str(out), **kw), StatsFile.load(stats_path))


def test_every_output_says_what_made_it(corpus, tmp_path):
    folder, stats, targets = corpus
    out = tmp_path / "scores"
    _score(stats["a"], targets[:1], out)
    made = json.loads(pq.read_schema(out / "00000.parquet").metadata[b"wclip"])
    record = marker(out, "00000")["provenance"]
    assert made == record
    assert made["format"] == "wclip-scores/2" and made["normalize"] is False
    assert made["model"]["model"] == "wclip-tiny" and made["model"]["weights"] == "random-init:seed=0"
    assert made["stats_digest"] == hashlib.sha256(open(stats["a"], "rb").read()).hexdigest()
    assert made["input"]["url"] == targets[0]
    assert made["input"]["size"] == (folder / "target" / "00000.tar").stat().st_size
    assert made["input"]["mtime"] and made["wclip_version"]
    assert marker(out, "00000")["parquet"] == {"bytes": (out / "00000.parquet").stat().st_size, "rows": 12}


def test_a_refit_or_another_model_is_refused_before_any_work(corpus, tmp_path):
    _, stats, targets = corpus
    out = tmp_path / "scores"
    _score(stats["a"], targets[:2], out)
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    with pytest.raises(ConfigError, match=r"holds scores made with stats [0-9a-f]{12} .*a\.safetensors.*this run "
                                          r"uses stats [0-9a-f]{12} .*b\.safetensors.*--overwrite"):
        _score(stats["b"], targets, out)
    with pytest.raises(ConfigError, match=r"model wclip-tiny \(random-init:seed=0\).*model wclip-tiny "
                                          r"\(random-init:seed=1\)"):
        _score(stats["other_model"], targets, out, model_seed=1)
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before  # nothing touched
    # --overwrite rescoring every shard it holds: the folder then holds the new fit only
    summary = _score(stats["b"], targets, out, overwrite=True)
    assert summary["shards_done"] == 3 and summary["shards_skipped"] == 0
    digests = {json.loads(pq.read_schema(p).metadata[b"wclip"])["stats_digest"] for p in out.glob("*.parquet")}
    assert len(digests) == 1 and {m["provenance"]["stats_digest"] for m in map(json.loads, map(
        lambda p: p.read_text(), marker_files(out)))} == digests


def test_overwrite_refuses_to_leave_shards_of_the_old_fit_behind(corpus, tmp_path):
    _, stats, targets = corpus
    out = tmp_path / "scores"
    _score(stats["a"], targets, out)
    with pytest.raises(ConfigError, match=r"--overwrite would leave 1 shard\(s\) scored with .* \(00002\)"):
        _score(stats["b"], targets[:2], out, overwrite=True)


def test_a_missing_or_changed_score_file_is_rescored(corpus, tmp_path):
    _, stats, targets = corpus
    out = tmp_path / "scores"
    _score(stats["a"], targets, out)
    good = pq.read_table(out / "00001.parquet")
    (out / "00000.parquet").unlink()
    (out / "00001.parquet").write_bytes((out / "00001.parquet").read_bytes()[:-100])  # truncated
    summary = _score(stats["a"], targets, out)
    assert summary["shards_done"] == 2 and summary["shards_skipped"] == 1
    assert pq.read_table(out / "00000.parquet").num_rows == 12
    assert pq.read_table(out / "00001.parquet").drop(["shard"]).equals(good.drop(["shard"]))


def test_files_of_other_tools_are_never_overwritten(corpus, tmp_path):
    _, stats, targets = corpus
    out = tmp_path / "img2dataset"
    out.mkdir()
    theirs = pa.table({"url": ["http://x/0.jpg"], "uid": ["0" * 32], "sha256": ["ab"], "exif": ["{}"]})
    pq.write_table(theirs, out / "00000.parquet")
    (out / "00000_stats.json").write_text('{"successes": 1}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"already holds 1 file\(s\) that wclip did not write and this run would "
                                          r"replace \(00000\.parquet; img2dataset's metadata\?\)"):
        _score(stats["a"], targets[:1], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a shard with another name scores beside them, and leaves their files alone
    _score(stats["a"], targets[1:2], out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before


def test_the_folder_loads_in_pandas_pyarrow_duckdb_and_datasets_empty_shard_included(corpus, tmp_path):
    import duckdb
    import pandas
    import pyarrow.dataset as ds
    from datasets import load_dataset

    _, stats, targets = corpus
    empty = write_shard(tmp_path / "00009.tar", [])
    out = tmp_path / "scores"
    _score(stats["a"], targets[:2] + [empty], out, save_embeddings=True)
    assert pq.read_table(out / "00009.parquet").num_rows == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "00000.parquet", "00001.parquet", "00009.parquet"]
    assert len(pandas.read_parquet(out)) == 24
    assert ds.dataset(out).count_rows() == 24
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall() == [(24,)]
    assert load_dataset(str(out), split="train").num_rows == 24
    assert load_dataset("parquet", data_dir=str(out), split="train").num_rows == 24


def test_failure_records_of_shards_not_rerun_are_kept(corpus, tmp_path):
    _, stats, targets = corpus
    out = tmp_path / "scores"
    missing = str(tmp_path / "00007.tar")
    junk = tmp_path / "00008.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    summary = _score(stats["a"], targets[:1] + [missing, str(junk)], out, retries=0)
    assert {f["shard"] for f in summary["failed"]} == {missing, str(junk)}
    summary = _score(stats["a"], targets[:1] + [str(junk)], out, retries=0)  # 00007 is not rerun
    records = [json.loads(line) for line in (state(out) / "failures.jsonl").read_text().splitlines()]
    assert sorted(r["shard"] for r in records) == sorted([missing, str(junk)])


def test_a_cut_http_transfer_fails_the_shard_and_writes_nothing(corpus, tmp_path):
    _, stats, targets = corpus
    out = tmp_path / "scores"
    with open(targets[2], "rb") as fh:
        payload = fh.read()
    with http_server(cut_transfer(payload)) as base:
        url = f"{base}/00002.tar"
        summary = _score(stats["a"], [url], out, retries=1)
    assert [f["shard"] for f in summary["failed"]] == [url]
    assert "TransportError" in summary["failed"][0]["error"] and not summary["damaged"]
    assert not (out / "00002.parquet").exists() and not marker_files(out)
    record = json.loads((state(out) / "failures.jsonl").read_text())
    assert record["shard"] == url and record["attempts"] == 2


def test_scores_match_between_a_resumed_and_a_fresh_run(corpus, tmp_path):
    _, stats, targets = corpus
    _score(stats["a"], targets, tmp_path / "one")
    _score(stats["a"], targets[:1], tmp_path / "two")
    summary = _score(stats["a"], targets, tmp_path / "two")
    assert summary["shards_skipped"] == 1 and summary["shards_done"] == 2
    for name in ("00000", "00001", "00002"):
        a, b = (pq.read_table(tmp_path / d / f"{name}.parquet") for d in ("one", "two"))
        assert a.drop(["shard"]).equals(b.drop(["shard"]))
        np.testing.assert_array_equal(a["image_sqnorm"].to_numpy(zero_copy_only=False),
                                      b["image_sqnorm"].to_numpy(zero_copy_only=False))


def test_parquet_encodings_dictionaries_and_statistics():
    """Dictionaries only where values repeat; min/max statistics on every column but free text; floats
    byte-stream-split; an empty table is a file with no row group (Hugging Face datasets rejects a 0-row
    group)."""
    import io

    from pipeline.scores.table import table_bytes

    n = 1000
    table = pa.table({"key": [f"{i:06d}" for i in range(n)], "shard": ["s/00000.tar"] * n,
                      "url": [f"https://e.org/{i}.jpg" for i in range(n)], "caption": [f"c {i}" for i in range(n)],
                      "status": ["ok"] * n, "error": pa.nulls(n, pa.string()),
                      "image_loglik": pa.array(np.linspace(-5, 5, n), pa.float32())})
    meta = pq.ParquetFile(io.BytesIO(table_bytes(table))).metadata
    chunks = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    dictionary = {c for c, chunk in chunks.items() if "RLE_DICTIONARY" in chunk.encodings}
    assert dictionary == {"shard", "status", "error"}
    assert {c for c, chunk in chunks.items() if chunk.is_stats_set} == {"key", "shard", "status", "image_loglik"}
    assert chunks["image_loglik"].statistics.min == -5.0 and chunks["key"].statistics.max == "000999"
    assert meta.num_rows == n and chunks["key"].compression == "ZSTD" and chunks["url"].compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in chunks["image_loglik"].encodings and chunks["image_loglik"].compression == "SNAPPY"
    assert pq.read_table(io.BytesIO(table_bytes(table))).equals(table)
    assert pq.ParquetFile(io.BytesIO(table_bytes(table.slice(0, 0)))).metadata.num_row_groups == 0
    nested = pa.table({"url": ["a"], "json": pa.array([{"w": 1}])})  # nested columns: statistics everywhere
    meta = pq.ParquetFile(io.BytesIO(table_bytes(nested))).metadata
    assert all(meta.row_group(0).column(i).is_stats_set for i in range(meta.num_columns))


def test_planning_a_resume_keeps_little_of_each_marker(tmp_path):
    """A resume reads every shard's marker; it keeps only what planning needs (parsed whole, a marker took
    ~3.6 KB: 2 GB for LAION's 585,000 shards)."""
    import tracemalloc

    from pipeline.scores.folder import plan_folder

    made = {"stats_digest": "ab" * 32, "stats_path": "/stats.safetensors", "normalize": False,
            "model": {"model": "wclip-demo", "weights": "builtin:sha256:" + "cd" * 32}, "wclip_version": "0"}
    (state(tmp_path) / "shards").mkdir(parents=True)
    names = [f"{i:06d}" for i in range(2000)]
    for name in names:
        (tmp_path / f"{name}.parquet").write_bytes(b"x" * 100)
        marker = {"name": name, "rows": 4, "ok": 4, "status_counts": {"ok": 4}, "duration_s": 0.2,
                  "shard": f"/data/{name}.tar", "parquet": {"bytes": 100, "rows": 4},
                  "provenance": dict(made, format="wclip-scores/2", written="2026-12-04T17:34:22+00:00",
                                     input={"url": f"/data/{name}.tar", "size": 20480, "mtime": 1.7e9})}
        (state(tmp_path) / "shards" / f"{name}.json").write_text(json.dumps(marker, indent=1))
    plan_folder(str(tmp_path), names[:1], made, overwrite=False)   # imports outside the measurement
    tracemalloc.start()
    try:
        todo = plan_folder(str(tmp_path), names, made, overwrite=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert todo == []                                         # every shard done
    assert peak / len(names) < 2000, peak / len(names)        # bytes per shard: 1250 measured, 4100 before
    (tmp_path / "000007.parquet").write_bytes(b"x" * 99)      # a size that disagrees with its marker: redone
    assert plan_folder(str(tmp_path), names, made, overwrite=False) == ["000007"]
    with pytest.raises(ConfigError, match="one folder never mixes two fits"):
        plan_folder(str(tmp_path), names, dict(made, stats_digest="ef" * 32), overwrite=False)
