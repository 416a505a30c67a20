"""img2dataset's ``files`` and ``parquet`` layouts and Hugging Face image Parquet, read like tars: every
row or sample read is one output row (real files, real Parquet written by the tools' own conventions)."""

import json

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
    from pipeline.fit import fit
    from pipeline.score import score
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
