"""img2dataset's ``files`` and ``parquet`` layouts and Hugging Face image Parquet, read like tars: every
row or sample read is one output row (real files, real Parquet written by the tools' own conventions)."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardkit import image_bytes, sample, tiny_run

from pipeline.config import InputConfig, ScoreConfig
from pipeline.flow.formats import FolderReader, ParquetReader, expand_inputs, open_reader
from pipeline.flow.read import shard_name


def files_layout(root, shards=2, per_shard=5, broken=()):
    """img2dataset's ``output_format=files``: numbered subfolders of {key}.jpg/.txt/.json, with a Parquet
    and a _stats.json beside each."""
    for s in range(shards):
        folder = root / f"{s:05d}"
        folder.mkdir(parents=True)
        rows = []
        for j in range(per_shard):
            key, members = sample(s * per_shard + j)
            key = f"{s:05d}{j:04d}"
            if key in broken:
                members = dict(members, jpg=b"\xff\xd8 not a jpeg")
            for ext, data in members.items():
                (folder / f"{key}.{ext}").write_bytes(data)
            rows.append({"key": key, "url": json.loads(members["json"])["url"], "status": "success"})
        pq.write_table(pa.Table.from_pylist(rows), root / f"{s:05d}.parquet")
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return root


def test_files_layout_reads_each_subfolder_as_a_shard(tmp_path):
    root = files_layout(tmp_path / "out")
    urls = expand_inputs([str(root)], "files")
    assert urls == [str(root / "00000"), str(root / "00001")] and [shard_name(u) for u in urls] == ["00000", "00001"]
    samples = list(FolderReader(urls[1], 1 << 20))
    assert [s.key for s in samples] == [f"00001{j:04d}" for j in range(5)]
    assert set(samples[0].members) == {"jpg", "txt", "json"} and [s.index for s in samples] == list(range(5))


def test_img2dataset_parquet_and_hf_image_parquet(tmp_path):
    from datasets import Dataset, Image

    rows = [{"key": f"{i:09d}", "jpg": image_bytes(i), "txt": f"caption {i}", "url": f"http://x/{i}.jpg"}
            for i in range(4)]
    rows[2]["jpg"] = None  # a failed download keeps its row
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "00000.parquet")
    samples = list(ParquetReader(str(tmp_path / "00000.parquet"), 1 << 20))
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(4)]
    assert samples[0].members["txt"] == b"caption 0" and "jpg" not in samples[2].members
    assert json.loads(samples[1].members["json"]) == {"key": "000000001", "url": "http://x/1.jpg"}

    hf = Dataset.from_dict({"image": [{"bytes": image_bytes(i), "path": None} for i in range(3)],
                            "text": [f"hf caption {i}" for i in range(3)]}).cast_column("image", Image())
    hf.to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    samples = list(ParquetReader(str(tmp_path / "train-00000-of-00001.parquet"), 1 << 20))
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002"]
    assert samples[2].members["jpg"] == image_bytes(2) and samples[2].members["txt"] == b"hf caption 2"
    assert expand_inputs([str(tmp_path)], "parquet") == [str(tmp_path / "00000.parquet"),
                                                        str(tmp_path / "train-00000-of-00001.parquet")]


def test_a_parquet_without_image_column_is_named(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"no image column \(looked for image, jpg.*the file has text\)"):
        list(open_reader(str(tmp_path / "x.parquet"), InputConfig(input_format="parquet")))


@pytest.mark.parametrize("input_format", ["files", "parquet"])
def test_score_reads_the_formats_one_row_per_sample(tmp_path, ray_local, input_format):
    from pipeline.config import FitConfig
    from pipeline.runs.fit import fit
    from pipeline.runs.score import score
    from pipeline.whitening import StatsFile

    root = files_layout(tmp_path / "in", broken={"000010003"})
    if input_format == "parquet":  # the same samples as image bytes in Parquet, img2dataset's parquet output
        for s in range(2):
            folder = root / f"{s:05d}"
            rows = [{"key": p.stem, "jpg": p.read_bytes(), "txt": p.with_suffix(".txt").read_text()}
                    for p in sorted(folder.glob("*.jpg"))]
            pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{s:05d}.parquet")
        inputs = expand_inputs([str(tmp_path)], "parquet")
    else:
        inputs = expand_inputs([str(root)], "files")
    cfg_inputs = InputConfig(input_format=input_format)
    stats_path = str(tmp_path / "stats.safetensors")
    fit(FitConfig(run=tiny_run(inputs, inputs=cfg_inputs), output=stats_path, components=4, holdout=0.2))
    out = tmp_path / "scores"
    summary = score(ScoreConfig(run=tiny_run(inputs, inputs=cfg_inputs), stats_path=stats_path, output=str(out)),
                    StatsFile.load(stats_path))
    assert summary["rows"] == 10 and summary["status_counts"] == {"decode": 1, "ok": 9}
    table = pq.read_table(out / "00001.parquet").to_pylist()
    assert [r["key"] for r in table] == [f"00001{j:04d}" for j in range(5)]
    assert table[3]["status"] == "decode" and table[3]["image_loglik"] is None and table[3]["text_loglik"] is not None


# -- a caption column that does not hold text (issue #26 item 3) -------------------------------------------
@pytest.mark.parametrize("values, kind", [
    ([3, 5], "int64"), ([int(1e11), 7], "int64"), ([2_000_000_000, 1], "int64"), ([0.5, 1.5], "double"),
    ([["a", "b"], ["c"]], "list<element: string>"), ([{"t": "a"}, {"t": "b"}], "struct<t: string>"),
    ([True, False], "bool")])
def test_a_caption_column_that_is_not_text_is_refused_before_any_row(tmp_path, values, kind):
    """A number used to become that many NUL bytes scored ok (1e11: MemoryError), a float or list a
    TypeError that lost every row; now the file is refused in one line naming the column and its type."""
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": [image_bytes(0), image_bytes(1)], "text": values}),
                   tmp_path / "00000.parquet")
    message = (f"{tmp_path / '00000.parquet'}: the caption column 'text' holds {kind}, not text (string, or "
               f"binary holding UTF-8); the caption is the first of caption, text, txt, prompt present: rename "
               f"that column or store the captions as strings")
    with pytest.raises(ValueError) as refused:
        expand_inputs([str(tmp_path)], "parquet")
    assert str(refused.value) == message
    reader = open_reader(str(tmp_path / "00000.parquet"), InputConfig(input_format="parquet"))
    with pytest.raises(ValueError) as failed:  # a later file of another schema: that file fails, recorded
        next(iter(reader))
    assert str(failed.value) == message


def test_binary_dictionary_and_null_captions_are_read(tmp_path):
    rows = {"jpg": [image_bytes(i) for i in range(3)]}
    cases = {"binary": pa.array([b"caf\xc3\xa9", b"\xff bad utf-8", None], pa.binary()),
             "dictionary": pa.array(["x", "y", "x"]).dictionary_encode(),
             "null": pa.nulls(3)}
    for name, column in cases.items():
        pq.write_table(pa.table(dict(rows, caption=column)), tmp_path / f"{name}.parquet")
    assert expand_inputs([str(tmp_path)], "parquet") == [str(tmp_path / f"{n}.parquet")
                                                        for n in ("binary", "dictionary", "null")]
    captions = {name: [s.members.get("txt") for s in ParquetReader(str(tmp_path / f"{name}.parquet"), 1 << 20)]
                for name in cases}
    assert captions == {"binary": [b"caf\xc3\xa9", b"\xff bad utf-8", None], "dictionary": [b"x", b"y", b"x"],
                        "null": [None, None, None]}


def test_an_oversized_caption_is_skipped_like_an_oversized_member(tmp_path):
    pq.write_table(pa.table({"jpg": [image_bytes(0)], "txt": ["x" * 5000]}), tmp_path / "00000.parquet")
    [only] = ParquetReader(str(tmp_path / "00000.parquet"), 4096)
    assert "txt" not in only.members and only.members["jpg"] == image_bytes(0)
    assert only.skipped == ["column txt is 5000 bytes, over the 4096-byte limit (raise --max-member-bytes if such "
                            "captions are legitimate)"]


def test_the_command_refuses_a_non_text_caption_in_one_line_before_any_work(tmp_path, capsys):
    from pipeline.cli import main

    pq.write_table(pa.table({"jpg": [image_bytes(0)], "caption": pa.array([1.5])}), tmp_path / "00000.parquet")
    stats = tmp_path / "stats.safetensors"
    code = main(["fit", "--input", str(tmp_path), "--input-format", "parquet", "--output", str(stats),
                 "--model", "wclip-tiny", "--random-init", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not stats.exists()
    assert err[-1] == (f"wclip fit: error: {tmp_path / '00000.parquet'}: the caption column 'caption' holds double, "
                       f"not text (string, or binary holding UTF-8); the caption is the first of caption, text, txt, "
                       f"prompt present: rename that column or store the captions as strings")


# -- what the files layout used to skip without a word (issue #26 item 6) ---------------------------------
def test_symlinked_members_are_followed_and_a_dangling_link_is_a_read_row(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.jpg").write_bytes(image_bytes(0))
    (store / "a.txt").write_bytes(b"linked caption")
    shard = tmp_path / "00000"
    shard.mkdir()
    (shard / "a.jpg").symlink_to(store / "a.jpg")
    (shard / "a.txt").symlink_to("../store/a.txt")  # relative, as `cp -s` or a dedup tool writes
    (shard / "b.jpg").symlink_to(store / "gone.jpg")
    (shard / "b.txt").write_bytes(b"b")
    reader = FolderReader(str(shard), 1 << 20)
    samples = list(reader)
    assert [s.key for s in samples] == ["a", "b"] and reader.damage is None
    assert samples[0].members == {"jpg": image_bytes(0), "txt": b"linked caption"} and samples[0].skipped == []
    assert samples[1].members == {"txt": b"b"}
    assert samples[1].skipped == [f"member .jpg (b.jpg) is a dangling symbolic link (to {store / 'gone.jpg'}): "
                                  f"not read"]


def test_case_clashing_names_read_neither_and_say_so(tmp_path):
    shard = tmp_path / "00000"
    shard.mkdir()
    (shard / "a.JPG").write_bytes(image_bytes(0))
    (shard / "a.jpg").write_bytes(image_bytes(1))
    (shard / "a.txt").write_bytes(b"caption")
    os.mkfifo(shard / "c.jpg")  # reading it would block for ever
    (shard / "c.txt").write_bytes(b"fifo")
    samples = list(FolderReader(str(shard), 1 << 20))
    assert [s.key for s in samples] == ["a", "c"]
    assert samples[0].members == {"txt": b"caption"}
    assert samples[0].skipped == ["member .jpg not read: 2 files give it (a.JPG, a.jpg: their names differ only in "
                                  "case); rename or remove all but one"]
    assert samples[1].members == {"txt": b"fifo"}
    assert samples[1].skipped == ["member .jpg (c.jpg) is not a regular file (a fifo, socket or device): not read"]


def test_nested_folders_and_loose_files_are_named(tmp_path, caplog):
    root = files_layout(tmp_path / "out", shards=2, per_shard=2)
    for name in ("x", "y", "z", "w"):
        (root / "00000" / name).mkdir()
    (root / "00001" / "linked").symlink_to(root / "00000")
    (root / "stray.jpg").write_bytes(image_bytes(9))
    (root / "stray.txt").write_bytes(b"stray")
    (root / "_SUCCESS").write_bytes(b"")  # hidden by convention, as inside a shard folder
    with caplog.at_level("WARNING", logger="wclip"):
        urls = expand_inputs([str(root)], "files")
    assert urls == [str(root / "00000"), str(root / "00001")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{root}: 2 files beside its shard subfolders not read (stray.jpg, stray.txt): only the files inside each "
        f"subfolder are samples; move them into a subfolder of their own to score them"]  # not 0000N.parquet/_stats
    readers = [FolderReader(u, 1 << 20) for u in urls]
    assert [len(list(r)) for r in readers] == [2, 2]
    assert [r.damage for r in readers] == [
        "4 folders inside this shard folder not read (w, x, y and 1 more): wclip reads the files directly in a "
        "shard folder; pass such a folder as its own --input",
        "1 folder inside this shard folder not read (linked): wclip reads the files directly in a shard folder; "
        "pass such a folder as its own --input"]
    caplog.clear()  # a shard folder given with a folder inside: that folder is the unit, its files are named
    with caplog.at_level("WARNING", logger="wclip"):
        assert expand_inputs([str(root / "00001")], "files") == [str(root / "00001" / "linked")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{root / '00001'}: 6 files beside its shard subfolders not read (000010000.jpg, 000010000.json, "
        f"000010000.txt and 3 more): only the files inside each subfolder are samples; move them into a subfolder "
        f"of their own to score them"]


# -- `wclip filter --input-format files|parquet` (issue #29 item 3) ------------------------------------------
def _tar_members(path) -> dict:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _as_parquet_layout(root, out):
    """img2dataset's ``parquet`` output of the same samples: ``NNNNN.parquet`` with key, jpg bytes, txt, url."""
    out.mkdir()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        rows = [{"key": p.stem, "jpg": p.read_bytes(), "txt": p.with_suffix(".txt").read_text(),
                 "url": json.loads(p.with_suffix(".json").read_text())["url"], "width": 40, "height": 40}
                for p in sorted(folder.glob("*.jpg"))]
        pq.write_table(pa.Table.from_pylist(rows), out / f"{folder.name}.parquet")
    return out


@pytest.mark.parametrize("input_format", ["files", "parquet"])
def test_filter_writes_the_kept_samples_of_img2datasets_other_layouts_as_tars(tmp_path, monkeypatch, input_format):
    from pipeline.cli import main

    root = files_layout(tmp_path / "i2d_files", broken={"000010003"})
    given = str(root) if input_format == "files" else str(_as_parquet_layout(root, tmp_path / "i2d_parquet"))
    model = ["--model", "wclip-tiny", "--random-init", "--executor", "local", "--no-progress"]
    stats, scores, keep = (str(tmp_path / n) for n in ("stats.safetensors", "scores", "keep"))
    assert main(["fit", "--input", given, "--input-format", input_format, "--output", stats, *model]) == 0
    assert main(["score", "--input", given, "--input-format", input_format, "--stats", stats, "--output", scores,
                 *model]) == 0
    assert main(["filter", "--scores", scores, "--output", keep, "--keep-fraction", "clip_score=0.5",
                 "--input", given, "--input-format", input_format, "--samples-per-shard", "3"]) == 0

    report = json.loads((tmp_path / "keep" / "filter.json").read_text())
    kept = [r for f in sorted((tmp_path / "keep" / "kept").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert report["kept"] == len(kept) == 5 and report["rows"] == 10 and report["eligible"] == 9
    shards = report["shards"]
    assert (shards["shards"], shards["samples"], shards["copied"], shards["failed"]) == (2, 5, 5, [])
    assert shards["input_format"] == input_format
    members, meta = {}, []
    for n in range(2):
        members.update(_tar_members(tmp_path / "keep" / "shards" / f"{n:05d}.tar"))
        meta += pq.read_table(tmp_path / "keep" / "shards" / f"{n:05d}.parquet").to_pylist()
    assert [m["key"] for m in meta] == [r["key"] for r in kept] and {m["status"] for m in meta} == {"success"}
    sizes = (40, 40) if input_format == "parquet" else (None, None)  # the Parquet's width/height columns
    assert [(m["width"], m["height"]) for m in meta] == [sizes] * 5
    for row in kept:  # the kept samples' bytes as the input holds them
        key, folder = row["key"], root / row["key"][:5]
        assert members.pop(f"{key}.jpg") == (folder / f"{key}.jpg").read_bytes()
        assert members.pop(f"{key}.txt") == (folder / f"{key}.txt").read_bytes()
        meta_json = json.loads(members.pop(f"{key}.json"))
        assert meta_json["url"] == json.loads((folder / f"{key}.json").read_text())["url"]
    assert members == {}  # nothing else: no sample that was not kept


def test_filter_says_how_to_read_img2datasets_other_layouts(tmp_path, capsys):
    from pipeline.cli import main

    root = files_layout(tmp_path / "i2d_files", shards=1, per_shard=1)
    scores = tmp_path / "scores"
    scores.mkdir()
    assert main(["filter", "--scores", str(scores), "--output", str(tmp_path / "keep"), "--min", "clip_score=0",
                 "--input", str(root)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"wclip filter: error: no shards matched [{str(root)!r}]: {root} is a folder without .tar shards; "
        f"img2dataset's other layouts are read with --input-format files (numbered subfolders of "
        f"{{key}}.jpg/.txt/.json) or --input-format parquet (image bytes in Parquet files)"]
    assert not (tmp_path / "keep").exists()


def test_a_kept_files_sample_with_an_unreadable_member_is_not_copied_and_says_why(tmp_path):
    from pipeline.curate.source import UNREADABLE_MEMBER, kept_samples

    root = files_layout(tmp_path / "i2d", shards=1, per_shard=3)
    os.symlink(tmp_path / "nowhere.jpg", root / "00000" / "000000001.png")  # a dangling link
    rows = [{"key": f"00000{j:04d}", "index": j} for j in range(3)]
    outcomes = list(kept_samples(str(root / "00000"), rows, "files"))
    assert [o.row["key"] for o in outcomes] == ["000000000", "000000001", "000000002"]
    assert [o.kind for o in outcomes] == [None, UNREADABLE_MEMBER, None]
    assert outcomes[1].reason.startswith("not copied: member .png (000000001.png) is a dangling symbolic link")
    assert [info.name for info, _ in outcomes[2].sample.members] == ["000000002.jpg", "000000002.json",
                                                                     "000000002.txt"]
    assert outcomes[2].sample.members[0][1] == (root / "00000" / "000000002.jpg").read_bytes()
