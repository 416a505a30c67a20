"""wclip filter: exact thresholds, ties, uid lists, byte-identical resharding, resume, safety."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import FilterConfig
from pipeline.curate.filter import Condition, run_filter
from pipeline.curate.members import member_name
from pipeline.curate.select import RadixSelect
from pipeline.curate.uids import UID_DTYPE, UidCollector, parse_uids, uid_to_int
from pipeline.executors.local import map_on_threads
from pipeline.executors.ray import map_tasks

SCORES = ("image_sqnorm", "image_loglik", "image_pvalue", "text_sqnorm", "text_loglik",
          "text_pvalue", "clip_score")


# ---- synthetic corpus -------------------------------------------------------------------------
def write_tar(path, samples):
    """``samples``: list of (key, {ext: bytes}); members written in that order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def make_corpus(root, n_shards=4, per_shard=25, seed=0, extra_member=None, uids=True):
    """Tar shards plus matching score files (``index`` = the sample's position in its tar, as `wclip score`
    writes it); returns (shard paths, scores dir, all rows)."""
    rng = np.random.default_rng(seed)
    shard_dir, score_dir = root / "data", root / "scores"
    shard_dir.mkdir()
    score_dir.mkdir()
    urls, rows = [], []
    for s in range(n_shards):
        url = str(shard_dir / f"{s:05d}.tar")
        samples, shard_rows = [], []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            uid = rng.bytes(16).hex()
            if i == 3:
                uid = "not-a-uid"
            caption = f"caption {s}-{i}"
            meta = {"url": f"http://x/{key}", "uid": uid, "width": 10 + i, "height": 20 + i}
            members = {"jpg": rng.bytes(int(rng.integers(10, 2000))), "txt": caption.encode(),
                       "json": json.dumps(meta).encode()}
            samples.append((key, members))
            status = "ok" if i % 7 != 5 else "decode"
            vals = {"image_sqnorm": rng.chisquare(16), "text_sqnorm": rng.chisquare(16),
                    "clip_score": round(float(rng.normal(0.3, 0.05)), 2),  # many ties
                    "image_pvalue": rng.random(), "text_pvalue": rng.random()}
            vals["image_loglik"] = -0.5 * (16 * math.log(2 * math.pi) + vals["image_sqnorm"])
            vals["text_loglik"] = -0.5 * (16 * math.log(2 * math.pi) + vals["text_sqnorm"])
            if status != "ok":
                vals = {c: None for c in SCORES}
            elif i == 8:
                vals["clip_score"] = None
            shard_rows.append(dict(key=key, shard=url, index=i, url=f"http://x/{key}", uid=uid if uids else None,
                                   caption=caption, status=status, error=None if status == "ok" else "bad jpeg",
                                   **{c: vals.get(c) for c in SCORES}))
        if extra_member and s == 0:
            samples.insert(1, extra_member)
            extra = dict(key=extra_member[0], shard=url, index=1, url=None, uid=None, caption="x",
                         status="ok", error=None, **{c: 1e6 for c in SCORES})
            extra["image_sqnorm"] = 0.0
            shard_rows.insert(1, extra)
        for position, row in enumerate(shard_rows):
            row["index"] = position
        rows += shard_rows
        write_tar(url, samples)
        write_scores(score_dir / f"{s:05d}.parquet", shard_rows)
        urls.append(url)
    (score_dir / ".00009.parquet.tmp").write_bytes(b"partial")   # must be ignored
    return urls, score_dir, rows


def write_scores(path, rows, provenance=None):
    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
                        ("url", pa.string()), ("uid", pa.string()), ("caption", pa.string()),
                        ("status", pa.string()), ("error", pa.string())]
                       + [(c, pa.float32()) for c in SCORES],
                       metadata={b"wclip": json.dumps(provenance).encode()} if provenance else None)
    table = pa.table({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema)
    pq.write_table(table, path, row_group_size=7)


def read_column(score_dir, column):
    table = pa.concat_tables(pq.read_table(p) for p in sorted(score_dir.glob("[0-9]*.parquet")))
    ok = np.array([s == "ok" for s in table.column("status").to_pylist()])
    vals = np.array([np.nan if v is None else v for v in table.column(column).to_pylist()], np.float64)
    return table, ok, vals


def members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


# ---- exact selection ---------------------------------------------------------------------------
def test_radix_select_matches_sorting_with_ties_and_signs():
    rng = np.random.default_rng(1)
    for trial in range(12):
        n = int(rng.integers(1, 3000))
        x = rng.normal(-400, 30, n).astype(np.float32) if trial % 2 else \
            rng.integers(-3, 4, n).astype(np.float32)      # heavy ties, zeros of both signs
        x[: n // 10] = -0.0
        for fraction, num, den in ((0.0, 0, 1), (1e-4, 1, 10_000), (0.3, 3, 10), (0.5, 1, 2),
                                   (0.07, 7, 100), (1.0, 1, 1)):
            sel = RadixSelect(fraction, collect_limit=int(rng.choice([0, 5, 1 << 20])))
            while not sel.done:
                for part in np.array_split(x, 5):
                    sel.update(part)
                sel.finish_pass()
            k = -(-num * n // den)                       # ceil(fraction * n), in integers
            expect = math.inf if k == 0 else float(np.sort(x.astype(np.float64))[::-1][k - 1])
            assert sel.threshold == expect and sel.k == k and sel.n == n


def test_thresholds_counts_and_kept_rows_match_independent_computation(tmp_path):
    urls, score_dir, _ = make_corpus(tmp_path)
    conditions = (Condition.parse("fraction", "clip_score=30%"),
                  Condition.parse("fraction", "image_sqnorm=0.8"),      # lower is better
                  Condition.parse("min", "text_pvalue=0.05"),
                  Condition.parse("max", "image_loglik=-10"))
    report = run_filter(FilterConfig(str(score_dir), str(tmp_path / "out"), conditions))

    table, ok, _ = read_column(score_dir, "clip_score")
    keep = ok.copy()
    got = {c["column"]: c for c in report["conditions"]}
    for cond in conditions:
        _, _, v = read_column(score_dir, cond.column)
        if cond.kind == "fraction":
            ranked = v[ok & np.isfinite(v)]
            k = math.ceil(Fraction(repr(cond.value)) * ranked.size)
            best_first = np.sort(ranked)[::-1] if cond.keep == "highest" else np.sort(ranked)
            threshold = float(best_first[k - 1])
            assert got[cond.column]["ranked"] == ranked.size and got[cond.column]["rank"] == k
        else:
            threshold = cond.value
        hit = np.isfinite(v) & ((v >= threshold) if got[cond.column]["op"] == ">=" else (v <= threshold))
        assert got[cond.column]["threshold"] == pytest.approx(threshold, rel=0, abs=0)
        assert got[cond.column]["passed"] == int((hit & ok).sum())
        keep &= hit
    assert got["image_sqnorm"]["op"] == "<=" and got["clip_score"]["op"] == ">="
    assert report["rows"] == len(ok) and report["eligible"] == int(ok.sum())
    assert report["kept"] == int(keep.sum()) > 0
    kept = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "out/kept").glob("*.parquet")))
    assert sorted(kept.column("key").to_pylist()) == \
        sorted(np.array(table.column("key").to_pylist())[keep].tolist())
    assert set(kept.column_names) >= {"key", "shard", "uid", "url", *SCORES}
    saved = json.loads((tmp_path / "out/filter.json").read_text())
    assert saved["kept"] == report["kept"] and len(saved["conditions"]) == 4


def test_ties_at_the_threshold_are_all_kept(tmp_path):
    score_dir = tmp_path / "scores"
    score_dir.mkdir()
    values = [1.0, 2.0, 2.0, 2.0, 2.0, 3.0, None, 5.0]
    status = ["ok"] * 7 + ["encode"]
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(8)], "shard": ["s.tar"] * 8,
                             "status": status, "clip_score": pa.array(values, pa.float32())}),
                   score_dir / "s.parquet")
    report = run_filter(FilterConfig(str(score_dir), str(tmp_path / "o"),
                                     (Condition.parse("fraction", "clip_score=0.5"),)))
    c = report["conditions"][0]
    # eligible with a value: 1,2,2,2,2,3 (n=6); k=3 -> threshold 2; 5 rows are >= 2
    assert (c["ranked"], c["rank"], c["threshold"], c["passed"]) == (6, 3, 2.0, 5)
    assert report["kept"] == 5
    low = run_filter(FilterConfig(str(score_dir), str(tmp_path / "o2"),
                                  (Condition.parse("fraction", "clip_score:lowest=0.1"),)))
    assert (low["conditions"][0]["threshold"], low["kept"]) == (1.0, 1)
    none = run_filter(FilterConfig(str(score_dir), str(tmp_path / "o3"),
                                   (Condition.parse("fraction", "clip_score=0"),)))
    assert none["kept"] == 0 and none["conditions"][0]["threshold"] == "inf"
    failed = run_filter(FilterConfig(str(score_dir), str(tmp_path / "o4"), (), include_failed=True))
    assert failed["kept"] == 8


def test_uid_list_sorted_complete_in_datacomp_dtype(tmp_path):
    urls, score_dir, rows = make_corpus(tmp_path, n_shards=3)
    report = run_filter(FilterConfig(str(score_dir), str(tmp_path / "out"),
                                     (Condition.parse("min", "text_pvalue=0.2"),)))
    arr = np.load(tmp_path / "out/uids.npy")
    assert arr.dtype == np.dtype("u8,u8")
    kept_uids = [r["uid"] for r in rows if r["status"] == "ok" and r["text_pvalue"] >= np.float32(0.2)]
    good = [u for u in kept_uids if len(u) == 32]
    assert [uid_to_int(u) for u in arr] == sorted(int(u, 16) for u in good)
    assert arr[0]["f0"] == int(min(good, key=lambda u: int(u, 16))[:16], 16)
    assert report["uids"]["malformed"] == len(kept_uids) - len(good) > 0


def test_uid_collector_spills_and_merges_sorted(tmp_path):
    rng = np.random.default_rng(3)
    hexes = [rng.bytes(16).hex() for _ in range(3000)] + ["AB" * 16, "g" * 32, None, "12"]
    parsed, malformed, missing = parse_uids(pa.array(hexes))
    assert (len(parsed), malformed, missing) == (3001, 2, 1) and parsed.dtype == UID_DTYPE
    collector = UidCollector(run_rows=257)                 # forces a dozen spilled runs
    for part in np.array_split(parsed, 9):
        collector.add(part)
    collector.write(tmp_path / "u.npy")
    merged = np.load(tmp_path / "u.npy")
    assert [uid_to_int(u) for u in merged] == sorted(int(h, 16) for h in hexes[:3001])
    assert os.listdir(tmp_path) == ["u.npy"]


def test_uid_collector_memory_stays_near_a_run(tmp_path):
    """Spill and merge hold about ``run_rows`` uids at a time, however many are collected (the merge used to
    read 65,536 from every run and memory-map the runs: a 1e8-row filter peaked at 1.5 GB)."""
    import tracemalloc

    run_rows, runs = 1 << 14, 16
    rng = np.random.default_rng(5)
    uids = np.empty(run_rows * runs, dtype=UID_DTYPE)
    uids["f0"], uids["f1"] = (rng.integers(0, 1 << 63, len(uids), dtype=np.uint64) for _ in range(2))
    warm = UidCollector(run_rows=2, spill_parent=str(tmp_path))   # imports (fsspec's) are not the collector's
    for part in np.array_split(uids[:8], 4):
        warm.add(part.copy())
    warm.write(tmp_path / "warm.npy")
    os.remove(tmp_path / "warm.npy")
    collector = UidCollector(run_rows=run_rows, spill_parent=str(tmp_path), min_block=run_rows // runs)
    tracemalloc.start()
    try:
        for part in np.array_split(uids, 64):
            collector.add(part.copy())
        collector.write(tmp_path / "u.npy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    run_bytes = run_rows * UID_DTYPE.itemsize
    assert peak < 10 * run_bytes, (peak, run_bytes)   # 4.5-8 runs' worth measured; 60 with the old 65,536-uid blocks
    merged = np.load(tmp_path / "u.npy")
    assert np.array_equal(merged, uids[np.lexsort((uids["f1"], uids["f0"]))])
    assert os.listdir(tmp_path) == ["u.npy"]


# ---- shards --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mapper", ["ray", "threads"])
def test_reshard_copies_members_byte_for_byte_and_resumes(tmp_path, ray_local, mapper):
    run_copies = {"ray": map_tasks, "threads": map_on_threads}[mapper]  # the two executors' maps
    evil = ("../../escape", {"txt": b"evil", "jpg": b"\xff\xd8bytes"})
    urls, score_dir, rows = make_corpus(tmp_path, n_shards=4, per_shard=25, extra_member=evil)
    conditions = (Condition.parse("fraction", "image_sqnorm=0.6"),)
    cfg = FilterConfig(str(score_dir), str(tmp_path / "out"), conditions, inputs=tuple(urls),
                       samples_per_shard=7, samples_per_task=10, progress=False)
    with pytest.raises(ValueError, match="needs a mapper"):
        run_filter(cfg)                              # shards need a way to run the copy tasks
    assert not (tmp_path / "out").exists()           # refused before any work
    report = run_filter(cfg, mapper=run_copies)
    s = report["shards"]
    assert not s["failed"] and s["finished"] == s["shards"] == math.ceil(report["kept"] / 7)
    assert s["tasks"] > 1 and s["assembled"] > 0     # some shards span two tasks (pieces joined)

    kept_keys = set(pq.read_table(tmp_path / "out/kept").column("key").to_pylist())
    assert "../../escape" in kept_keys
    expected = []                                    # kept members in input order, from the inputs
    for url in urls:
        for name, data in members(url):
            if name.rsplit(".", 1)[0] in kept_keys:
                expected.append((member_name(name), data))   # names made safe to extract
    out = tmp_path / "out/shards"
    tars = sorted(out.glob("*.tar"))
    got, counts = [], []
    for t in tars:
        m = members(t)
        got.extend(m)
        counts.append(len({n.rsplit(".", 1)[0] for n, _ in m}))
        stats = json.loads(t.with_name(t.name[:-4] + "_stats.json").read_text())
        assert stats["sha256"] == hashlib.sha256(t.read_bytes()).hexdigest()
        assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (counts[-1], counts[-1], 0)
        meta = pq.read_table(t.with_suffix(".parquet"))
        assert meta.column("key").to_pylist() == list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in m))
    assert got == expected                           # same (safe) names, same bytes, same order
    assert ("%2E%2E/%2E%2E/escape.txt", b"evil") in got and not any(n.startswith("..") for n, _ in got)
    assert counts[:-1] == [7] * (len(tars) - 1) and sum(counts) == report["kept"]
    assert not (tmp_path.parent / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert not list(tmp_path.rglob("escape*")) and not os.path.exists("../../escape.txt")
    assert not (out / ".wclip" / "pieces").exists() and (out / ".wclip" / "plan.json").exists()
    assert s["unreadable_count"] == 0 and s["copied"] == report["kept"]

    # resume: drop one finished shard, rerun; only its task runs and the bytes come out identical
    before = {t.name: t.read_bytes() for t in tars}
    stamps = {t.name: t.stat().st_mtime_ns for t in tars}
    tars[0].unlink()                                 # shard 0 lies wholly in the first task
    tars[0].with_name(tars[0].name[:-4] + "_stats.json").unlink()
    again = run_filter(cfg, mapper=run_copies)["shards"]
    assert again["tasks_run"] == 1 < again["tasks"] and again["finished"] == s["shards"]
    assert again["assembled"] == 0
    after = sorted(out.glob("*.tar"))
    assert {t.name: t.read_bytes() for t in after} == before
    assert all(t.stat().st_mtime_ns == stamps[t.name] for t in after if t.name != tars[0].name)

    # a different selection into the same folder is refused
    with pytest.raises(ValueError, match="different selection"):
        run_filter(FilterConfig(str(score_dir), str(tmp_path / "out"),
                                (Condition.parse("fraction", "image_sqnorm=0.5"),),
                                inputs=tuple(urls), samples_per_shard=7, progress=False), mapper=run_copies)


def test_cli_filter_and_user_errors(tmp_path, capsys):
    from pipeline.cli import main

    urls, score_dir, _ = make_corpus(tmp_path, n_shards=2)
    out = tmp_path / "out"
    assert main(["filter", "--scores", str(score_dir), "--output", str(out),
                 "--keep-fraction", "clip_score=0.5", "--max", "image_sqnorm=30"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "filter.json").read_text())
    assert [c["column"] for c in report["conditions"]] == ["image_sqnorm", "clip_score"]
    assert main(["filter", "--scores", str(score_dir), "--output", str(out),
                 "--min", "nope=1"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["filter", "--scores", str(score_dir), "--output", str(out),
                 "--keep-fraction", "clip_score=1.5"]) == 2
    assert main(["filter", "--scores", str(tmp_path / "missing"), "--output", str(out)]) == 2


def test_reshard_matches_inputs_by_name_and_reports_a_changed_shard(tmp_path, ray_local):
    urls, score_dir, _ = make_corpus(tmp_path, n_shards=2, per_shard=10)
    moved = tmp_path / "moved"
    moved.mkdir()
    for url in urls:
        os.rename(url, moved / os.path.basename(url))
    write_tar(moved / "00001.tar", [("0000100", {"txt": b"only one"})])   # no longer what was scored
    inputs = (str(moved / "00000.tar"), str(moved / "00001.tar"), str(moved / "00007.tar"))
    report = run_filter(FilterConfig(str(score_dir), str(tmp_path / "out"), (), inputs=inputs,
                                     samples_per_shard=4, samples_per_task=4, retries=0,
                                     progress=False), mapper=map_tasks)["shards"]
    assert (report["inputs_matched"], report["inputs_unmatched"]) == (2, 1)
    # the changed shard costs only its own kept samples: every output shard is finished, and each of its
    # kept samples is listed with the reason
    assert report["failed"] == [] and report["finished"] == report["shards"]
    changed = [u for u in report["unreadable"] if u["shard"] == urls[1]]
    assert changed and len(changed) == report["unreadable_count"] == report["samples"] - report["copied"]
    assert "has key '0000100', not '000010000' as scored" in changed[0]["reason"]
    assert all("differs from the" in u["reason"] for u in changed)
    assert not list((tmp_path / "out/shards").glob("**/*.tmp"))
