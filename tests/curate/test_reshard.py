"""wclip filter --input on damaged inputs: a truncated shard and a duplicated key cost only their own
samples (listed per sample, on the console and in filter.json), a rerun converges, and the new shards are
in img2dataset's layout (NNNNN.tar, NNNNN.parquet, NNNNN_stats.json) that img2dataset and webdataset read."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.curate.source import CHANGED, CUT_SHORT, DAMAGED, kept_samples

SCORES = ("image_sqnorm", "image_loglik", "image_pvalue", "text_sqnorm", "text_loglik",
          "text_pvalue", "clip_score")
# img2dataset 1.47.0: logger.write_stats() keys, and the metadata columns downloader.download_shard() adds
# to the input columns (url, caption, save_additional_columns such as uid) in NNNNN.parquet
I2D_STATS = ("count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time",
             "end_time", "status_dict")
I2D_COLUMNS = ("url", "caption", "uid", "key", "status", "error_message", "width", "height",
               "original_width", "original_height")


def write_tar(path, samples, end_marker=True):
    with open(path, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
            end = tar.offset
    if not end_marker:
        os.truncate(path, end)


def write_scores(path, rows):
    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
                        ("url", pa.string()), ("uid", pa.string()), ("caption", pa.string()),
                        ("status", pa.string()), ("error", pa.string())] + [(c, pa.float32()) for c in SCORES])
    pq.write_table(pa.table({f.name: [r.get(f.name) for r in rows] for f in schema}, schema=schema), path)


def sample(s, i, key=None):
    key = key or f"{s}-{i:03d}"
    meta = {"uid": f"{s:02x}{i:030x}", "width": 100 + i, "height": 50, "original_width": 200 + i,
            "original_height": 100}
    return key, {"jpg": f"image {s} {i} ".encode() * 40, "txt": f"caption {s} {i}".encode(),
                 "json": json.dumps(meta).encode()}


def make_corpus(root, per_shard=30):
    """Three shards; shard 1 is truncated inside sample 3's image; shard 2 has key "dup" at positions 2
    and 9 (only the row at index 9 passes clip_score >= 0.5)."""
    (root / "data").mkdir()
    (root / "scores").mkdir()
    urls, rows = [], []
    for s in range(3):
        url = str(root / "data" / f"{s:05d}.tar")
        samples = [sample(s, i, "dup" if s == 2 and i in (2, 9) else None) for i in range(per_shard)]
        write_tar(url, samples)
        shard_rows = []
        for i, (key, members) in enumerate(samples):
            meta = json.loads(members["json"])
            shard_rows.append(dict(key=key, shard=url, index=i, url=f"http://x/{s}/{i}", uid=meta["uid"],
                                   caption=f"caption {s} {i}", status="ok",
                                   clip_score=0.1 if (s, i) == (2, 2) else 0.9, image_loglik=-float(i)))
        write_scores(root / "scores" / f"{s:05d}.parquet", shard_rows)
        rows += shard_rows
        urls.append(url)
    with tarfile.open(urls[1]) as tar:
        cut = tar.getmember("1-003.jpg").offset_data + 100
    os.truncate(urls[1], cut)
    return urls, rows


def tar_members(path):
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            out.append((m.name, tar.extractfile(m).read()))
    return out


def test_truncated_shard_and_duplicate_key_cost_only_their_samples_and_rerun_converges(tmp_path, ray_local, capsys):
    from pipeline.cli import main

    urls, rows = make_corpus(tmp_path)
    out = tmp_path / "out"
    argv = ["filter", "--scores", str(tmp_path / "scores"), "--output", str(out), "--min", "clip_score=0.5",
            "--input", *urls, "--samples-per-shard", "7", "--samples-per-task", "25", "--no-progress",
            "--retries", "0"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    s = report["shards"]
    kept = [r for r in rows if r["clip_score"] >= 0.5]
    lost = [r for r in kept if r["shard"] == urls[1] and r["index"] >= 3]
    assert report["kept"] == len(kept) == 89 and s["failed"] == [] and s["assembled"] > 0
    assert (s["shards"], s["finished"], s["samples"]) == (13, 13, 89)
    assert (s["copied"], s["unreadable_count"]) == (89 - 27, 27) and len(lost) == 27

    # every unreadable sample is listed with shard, key and reason: the cut one, then those after the damage
    listed = s["unreadable"]
    assert [(u["shard"], u["key"], u["index"]) for u in listed] == [(r["shard"], r["key"], r["index"]) for r in lost]
    assert listed[0]["reason"].startswith("the shard is truncated or corrupt in or right after this sample")
    assert all(u["reason"].startswith("not read: the shard is truncated or corrupt after 3 samples")
               for u in listed[1:])
    assert json.loads((out / "filter.json").read_text())["shards"]["unreadable"] == listed
    # on the console: one line each, capped at 20 with a count
    lines = [line for line in captured.err.splitlines() if line.strip().startswith("unreadable:")]
    assert len(lines) == 20 and lines[0].strip() == f"unreadable: {urls[1]} key '1-003': {listed[0]['reason']}"
    assert "    ... and 7 more" in captured.err.splitlines()
    assert "27 kept samples could not be read and were not copied" in captured.err

    # the tars hold every readable kept sample, byte for byte, in order; of the two "dup" samples in shard 2
    # the one at the kept row's index (9) is copied, not the one at index 2
    shards_dir = out / "shards"
    expected = []
    for s_, url in enumerate(urls):
        for r in kept:
            if r["shard"] == url and r not in lost:
                expected += [(f"{r['key']}.{ext}", data) for ext, data in sample(s_, r["index"], r["key"])[1].items()]
    got = [m for n in range(13) for m in tar_members(shards_dir / f"{n:05d}.tar")]
    assert got == expected
    assert (b"image 2 9 " in dict(got)["dup.jpg"]) and b"image 2 2 " not in dict(got)["dup.jpg"]

    # img2dataset's layout: a metadata row per kept row (the unreadable ones with the reason) and the stats
    meta = pa.concat_tables(pq.read_table(shards_dir / f"{n:05d}.parquet") for n in range(13))
    assert meta.column_names[:len(I2D_COLUMNS)] == list(I2D_COLUMNS)
    assert meta.column("key").to_pylist() == [r["key"] for r in kept]
    assert meta.column("source_index").to_pylist() == [r["index"] for r in kept]
    status = meta.column("status").to_pylist()
    assert status == ["failed_to_download" if r in lost else "success" for r in kept]
    errors = meta.column("error_message").to_pylist()
    assert [e for e in errors if e] == [u["reason"] for u in listed]
    copied = [r for r in kept if r not in lost]
    assert [w for w, st in zip(meta.column("width").to_pylist(), status) if st == "success"] == \
        [100 + r["index"] for r in copied]
    assert meta.column("uid").to_pylist() == [r["uid"] for r in kept]
    assert meta.column("clip_score").to_pylist() == pytest.approx([r["clip_score"] for r in kept])
    stats = [json.loads((shards_dir / f"{n:05d}_stats.json").read_text()) for n in range(13)]
    assert all(set(I2D_STATS) <= set(st) for st in stats)
    assert sum(st["count"] for st in stats) == 89 and sum(st["successes"] for st in stats) == 62
    assert sum(st["failed_to_download"] for st in stats) == 27 and {st["failed_to_resize"] for st in stats} == {0}
    assert all(st["count"] == st["successes"] + st["failed_to_download"] for st in stats)
    assert sum(st["status_dict"].get(DAMAGED, 0) for st in stats) == 27
    assert all(st["duration"] == pytest.approx(st["end_time"] - st["start_time"]) for st in stats)
    assert sorted(p.name for p in shards_dir.iterdir()) == sorted(
        [f"{n:05d}{suffix}" for n in range(13) for suffix in (".tar", ".parquet", "_stats.json")] + [".wclip"])

    # webdataset reads the new shards as img2dataset's
    import webdataset as wds

    tars = [str(shards_dir / f"{n:05d}.tar") for n in range(13)]   # some hold only unreadable rows: no sample
    loaded = [x["__key__"] for x in wds.WebDataset(tars, shardshuffle=False, empty_check=False)]
    assert loaded == [r["key"] for r in copied]

    # a rerun converges: nothing to copy, the same listing, the same files
    before = {p.name: p.read_bytes() for p in shards_dir.iterdir() if p.is_file()}
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)["shards"]
    assert again["tasks_run"] == 0 and again["unreadable"] == listed and again["finished"] == 13
    assert {p.name: p.read_bytes() for p in shards_dir.iterdir() if p.is_file()} == before


def test_kept_samples_by_index_by_key_and_without_end_marker(tmp_path):
    url = str(tmp_path / "a.tar")
    samples = [sample(0, 0), sample(0, 1, "k"), sample(0, 2), sample(0, 3, "k"), sample(0, 4)]
    write_tar(url, samples, end_marker=False)            # cut short right after its last sample
    rows = [{"key": "k", "index": 3}, {"key": "0-004", "index": 4}, {"key": "0-000", "index": 0},
            {"key": "0-002", "index": 1}]                # index 1 holds "k", not "0-002"
    got = list(kept_samples(url, rows))
    assert [o.row["index"] for o in got] == [0, 1, 3, 4]
    assert [o.kind for o in got] == [None, CHANGED, None, CUT_SHORT]
    assert "sample #1 of the shard has key 'k', not '0-002'" in got[1].reason
    assert b"image 0 3 " in dict((i.name, d) for i, d in got[2].sample.members)["k.jpg"]

    # without an index (scores from another tool) a key's rows take its samples in tar order
    by_key = list(kept_samples(url, [{"key": "k"}, {"key": "k"}, {"key": "gone"}]))
    assert [b"image 0 1 " in dict((i.name, d) for i, d in by_key[0].sample.members)["k.jpg"],
            b"image 0 3 " in dict((i.name, d) for i, d in by_key[1].sample.members)["k.jpg"]] == [True, True]
    assert by_key[2].sample is None and by_key[2].kind == DAMAGED and "end-of-archive marker" in by_key[2].reason

    whole = str(tmp_path / "b.tar")
    write_tar(whole, samples)
    gone = list(kept_samples(whole, [{"key": "x", "index": 7}]))
    assert gone[0].kind == CHANGED and "holds 5 samples" in gone[0].reason
    (tmp_path / "c.tar").write_bytes(b"not a tar at all" * 64)
    broken = list(kept_samples(str(tmp_path / "c.tar"), [{"key": "x", "index": 0}]))
    assert broken[0].kind == DAMAGED and "not a readable tar" in broken[0].reason
    with pytest.raises(FileNotFoundError):                 # a missing shard is retried, not recorded
        list(kept_samples(str(tmp_path / "missing.tar"), [{"key": "x", "index": 0}]))


def test_an_adjacent_duplicate_key_is_two_samples_as_the_scores_count_them(tmp_path):
    """The key written twice in a row is two samples for the scorer (flow.read.KeyGrouping), so it is two for
    the copier too: every later sample keeps the index its row has, and each copy of "k" is its own sample."""
    from pipeline.flow.read import ShardReader

    url = str(tmp_path / "a.tar")
    samples = [sample(0, 0), sample(0, 1, "k"), sample(0, 2, "k"), sample(0, 3), sample(0, 4)]
    write_tar(url, samples)
    scored = [(s.index, s.key) for s in ShardReader(url)]
    assert scored == [(0, "0-000"), (1, "k"), (2, "k"), (3, "0-003"), (4, "0-004")]
    rows = [{"key": key, "index": index} for index, key in scored]
    got = list(kept_samples(url, rows))
    assert [(o.row["index"], o.kind) for o in got] == [(0, None), (1, None), (2, None), (3, None), (4, None)]
    images = [dict((i.name, d) for i, d in o.sample.members) for o in got]
    assert [b"image 0 1 " in images[1]["k.jpg"], b"image 0 2 " in images[2]["k.jpg"]] == [True, True]
    assert [len(m) for m in images] == [3, 3, 3, 3, 3]  # no member of one copy merged into the other
    assert b"image 0 4 " in images[4]["0-004.jpg"]


def _one_shard(tmp_path, samples, rows, include_failed=False):
    """One input shard of ``samples`` with score ``rows``, and the ``wclip filter --input`` that keeps them all
    (copy tasks on threads), to call."""
    from pipeline.config import FilterConfig
    from pipeline.curate.filter import run_filter
    from pipeline.executors.local import map_on_threads

    (tmp_path / "data").mkdir()
    (tmp_path / "scores").mkdir()
    url = str(tmp_path / "data" / "00000.tar")
    write_tar(url, samples)
    write_scores(tmp_path / "scores" / "00000.parquet", [dict(r, shard=url, index=i) for i, r in enumerate(rows)])
    cfg = FilterConfig(str(tmp_path / "scores"), str(tmp_path / "out"), (), include_failed=include_failed,
                       inputs=(url,), samples_per_shard=100, progress=False)
    return lambda: run_filter(cfg, mapper=map_on_threads)


def test_an_oversize_member_is_copied_streaming(tmp_path):
    """Issue #26 (8): a member scoring skipped (over --max-member-bytes), kept with --include-failed, was read
    whole into memory (1 GB member: 1-2 GB RSS). Now it is copied in 1 MiB pieces: byte-identical, and the copy's
    Python peak stays far below the member's 64 MiB."""
    import hashlib
    import tracemalloc

    big = os.urandom(1 << 20) * 64 + b"tail"
    digest, size = hashlib.sha256(big).hexdigest(), len(big)
    rows = [{"key": "0-000", "status": "ok"},
            {"key": "huge", "status": "read", "error": f"member .jpg is {size} bytes, over the 4194304-byte limit"},
            {"key": "0-002", "status": "ok"}]
    run = _one_shard(tmp_path, [sample(0, 0), ("huge", {"jpg": big, "txt": b"a huge image"}), sample(0, 2)], rows,
                     include_failed=True)
    del big
    tracemalloc.start()
    try:
        report = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["kept"] == 3 and not report["shards"]["failed"] and report["shards"]["copied"] == 3
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB copying a {size / 2**20:.0f} MiB member"
    with tarfile.open(tmp_path / "out" / "shards" / "00000.tar") as tar:
        names = tar.getnames()
        got = tar.extractfile("huge.jpg")
        h = hashlib.sha256()
        while chunk := got.read(1 << 20):
            h.update(chunk)
    assert names == ["0-000.jpg", "0-000.txt", "0-000.json", "huge.jpg", "huge.txt", "0-002.jpg", "0-002.txt",
                     "0-002.json"]
    assert h.hexdigest() == digest


def test_new_shards_hold_only_names_that_extract_inside_their_folder(tmp_path):
    """Issue #26 (12): absolute and ``..`` member names were copied verbatim, so ``tar x`` of a new shard wrote
    outside its folder. Now each is ``{safe key}.{ext}``; the metadata's key is the same safe key."""
    from pipeline.curate.members import member_name, safe_key

    hostile = ["../../escape", "/etc/cron.d/evil", "a/./b/../../c", "ok/000001"]
    samples = [(key, {"txt": key.encode(), "jpg": b"\xff\xd8" + key.encode()}) for key in hostile]
    report = _one_shard(tmp_path, samples, [{"key": key, "status": "ok"} for key in hostile])()
    assert report["shards"]["copied"] == 4
    shards = tmp_path / "out" / "shards"
    with tarfile.open(shards / "00000.tar") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "x", filter="data")        # refuses any name that leaves the folder
    assert names == ["%2E%2E/%2E%2E/escape.txt", "%2E%2E/%2E%2E/escape.jpg", "etc/cron.d/evil.txt",
                     "etc/cron.d/evil.jpg", "a/b/%2E%2E/%2E%2E/c.txt", "a/b/%2E%2E/%2E%2E/c.jpg", "ok/000001.txt",
                     "ok/000001.jpg"]
    assert (tmp_path / "x" / "etc" / "cron.d" / "evil.txt").read_bytes() == b"/etc/cron.d/evil"
    assert pq.read_table(shards / "00000.parquet").column("key").to_pylist() == \
        ["%2E%2E/%2E%2E/escape", "etc/cron.d/evil", "a/b/%2E%2E/%2E%2E/c", "ok/000001"]
    assert not list(tmp_path.parent.glob("escape*")) and not (tmp_path / "escape.txt").exists()
    assert safe_key("x\0y/../z") == "x%00y/%2E%2E/z" and member_name("/a//b/./k.seg.PNG") == "a/b/k.seg.PNG"
