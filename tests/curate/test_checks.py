"""wclip filter refuses what cannot work before any work: --input naming no scored shard, scores from two
fits or models, corrupt Parquet; says when uids.npy is not written; --dry-run writes nothing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardkit import state

from pipeline.cli import main

SCORES = ("image_sqnorm", "image_loglik", "image_pvalue", "text_sqnorm", "text_loglik",
          "text_pvalue", "clip_score")
DEMO = {"model": "wclip-demo", "weights": "builtin"}
OTHER = {"model": "ViT-B-32", "weights": "openai"}


def made(digest: str, model: dict, path="/fits/a.safetensors") -> dict:
    return {"format": "wclip-scores/2", "stats_digest": digest, "stats_path": path, "model": model,
            "normalize": False, "wclip_version": "0.1.0"}


def write_scores(path, n=6, provenance=None, uids=True, shard=None):
    rows = {"key": [f"{path.stem}-{i}" for i in range(n)], "shard": [shard or f"/data/{path.stem}.tar"] * n,
            "index": pa.array(range(n), pa.int32()), "status": ["ok"] * n,
            "clip_score": pa.array([0.1 * i for i in range(n)], pa.float32())}
    if uids is True:
        rows["uid"] = [f"{i:032x}" for i in range(n)]
    elif uids is None:
        rows["uid"] = pa.nulls(n, pa.string())
    table = pa.table(rows)
    if provenance:
        table = table.replace_schema_metadata({b"wclip": json.dumps(provenance).encode()})
    pq.write_table(table, path)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("wclip filter: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_inputs_matching_no_scored_shard_are_refused_before_any_work(tmp_path, capsys):
    scores = tmp_path / "scores"
    scores.mkdir()
    for name in ("00000", "00001"):
        write_scores(scores / f"{name}.parquet")
    out = tmp_path / "out"
    assert main(["filter", "--scores", str(scores), "--output", str(out), "--input",
                 str(tmp_path / "other" / "{00005..00006}.tar")]) == 2
    line = _err_line(capsys)
    assert f"the first, {tmp_path / 'other' / '00005.tar'} (shard name '00005'), has no scores" in line
    assert "the scores hold shards 00000, 00001" in line
    assert not out.exists()


def test_scores_from_two_fits_or_models_are_refused_and_unrecorded_ones_warned(tmp_path, capsys):
    scores = tmp_path / "scores"
    scores.mkdir()
    write_scores(scores / "00000.parquet", provenance=made("a" * 64, DEMO))
    write_scores(scores / "00001.parquet", provenance=made("b" * 64, DEMO, "/fits/b.safetensors"))
    out = tmp_path / "out"
    assert main(["filter", "--scores", str(scores), "--output", str(out)]) == 2
    line = _err_line(capsys)
    assert "made by different fits or models" in line
    assert f"{scores / '00000.parquet'} by stats aaaaaaaaaaaa (/fits/a.safetensors), model wclip-demo (builtin)" in line
    assert f"{scores / '00001.parquet'} by stats bbbbbbbbbbbb (/fits/b.safetensors)" in line
    assert not out.exists()

    write_scores(scores / "00001.parquet", provenance=made("a" * 64, OTHER))     # same fit, other model
    assert main(["filter", "--scores", str(scores), "--output", str(out)]) == 2
    assert "model ViT-B-32 (openai)" in _err_line(capsys)

    write_scores(scores / "00001.parquet")                                          # older wclip: no provenance
    write_scores(scores / "00002.parquet", provenance=made("a" * 64, DEMO))
    assert main(["filter", "--scores", str(scores), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["provenance"]["stats_digest"] == "a" * 64 and report["kept"] == 18
    assert report["warnings"] == ["1 of 3 score files record no provenance (00001.parquet: written by an older "
                                  "wclip or another tool); they could not be checked against the others"]
    assert f"warning: {report['warnings'][0]}" in captured.err


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pages"])
def test_corrupt_parquet_is_one_line_naming_the_file(tmp_path, capsys, damage):
    scores = tmp_path / "scores"
    scores.mkdir()
    write_scores(scores / "00000.parquet")
    bad = scores / "00001.parquet"
    write_scores(bad, n=500)
    data = bad.read_bytes()
    if damage == "pages":       # the footer is intact, the data pages are not: found while reading
        bad.write_bytes(data[:4] + b"\xff" * (len(data) // 2) + data[4 + len(data) // 2:])
    else:
        bad.write_bytes(b"this is not parquet " * 20 if damage == "garbage" else data[: len(data) // 2])
    assert main(["filter", "--scores", str(scores), "--output", str(tmp_path / "out"),
                 "--keep-fraction", "clip_score=0.5"]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"wclip filter: error: cannot read {bad} as Parquet (")
    assert "rerun that command to redo its shard" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uids", [None, False])      # a null uid column; no uid column at all
def test_no_uids_says_uids_npy_was_not_written_and_how_to_get_them(tmp_path, capsys, uids):
    scores = tmp_path / "scores"
    scores.mkdir()
    write_scores(scores / "00000.parquet", uids=uids)
    out = tmp_path / "out"
    assert main(["filter", "--scores", str(scores), "--output", str(out), "--min", "clip_score=0.2"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["uids"]["missing"] == 4
    assert ("uids: uids.npy not written: the 4 kept rows have no uid; img2dataset records a uid only when run "
            "with --save_additional_columns '[\"uid\"]'") in captured.err
    assert not (out / "uids.npy").exists()
    assert main(["filter", "--scores", str(scores), "--output", str(out), "--no-uids"]) == 0
    assert "uids.npy" not in capsys.readouterr().err


def test_dry_run_reads_footers_writes_nothing_and_starts_no_ray(tmp_path, capsys, monkeypatch):
    from pipeline.executors import ray as runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("a dry run must not start Ray")

    monkeypatch.setattr(runtime, "ray_session", no_ray)
    monkeypatch.setattr(runtime, "map_tasks", no_ray)
    scores, data = tmp_path / "scores", tmp_path / "data"
    scores.mkdir()
    data.mkdir()
    for name, n in (("00000", 6), ("00001", 9)):
        write_scores(scores / f"{name}.parquet", n=n, shard=str(data / f"{name}.tar"),
                     provenance=made("a" * 64, DEMO))
        (data / f"{name}.tar").write_bytes(b"")
    out = tmp_path / "out"
    argv = ["filter", "--scores", str(scores), "--output", str(out), "--keep-fraction", "clip_score=30%",
            "--min", "clip_score=0.01", "--input", str(data / "{00000..00002}.tar"), "--dry-run"]
    assert main(argv[:-3] + ["--dry-run"]) == 0           # without --input too
    capsys.readouterr()
    (data / "00002.tar").write_bytes(b"")
    assert main(argv) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["read"]["score_files"] == 2 and plan["read"]["rows"] == 15
    assert plan["read"]["conditions"] == ["clip_score >= 0.01", "keep the highest 0.3 of clip_score"]
    assert plan["read"]["inputs"] == {"given": 3, "matched": 2, "unmatched": 1,
                                      "unmatched_examples": [str(data / "00002.tar")]}
    assert plan["write"]["kept"] == [str(out / "kept" / "00000.parquet"), str(out / "kept" / "00001.parquet")]
    assert (plan["write"]["uids"], plan["write"]["filter_json"], plan["write"]["shards_dir"]) == \
        (str(out / "uids.npy"), str(out / "filter.json"), str(out / "shards"))
    assert "dry run: nothing is written, no Ray is started" in captured.err
    assert f"would read 2 score files (15 rows) in {scores}" in captured.err
    assert f"would write shards in {out / 'shards'}" in captured.err
    assert not out.exists()
    # the dry run makes the same checks: a condition on a missing column is refused
    assert main(argv[:-1] + ["--min", "nope=1", "--dry-run"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err


def test_a_scores_folder_that_lost_files_its_markers_record_is_refused_by_filter_and_card(tmp_path, capsys):
    from test_embeddings import write_clip_retrieval

    folder = write_clip_retrieval(tmp_path / "laion")
    stats, scores = str(tmp_path / "stats.safetensors"), tmp_path / "scores"
    assert main(["fit", "--embeddings", str(folder), "--output", stats, "--components", "4"]) == 0
    score = ["score", "--embeddings", str(folder), "--stats", stats, "--output", str(scores), "--no-progress"]
    assert main(score) == 0
    (scores / "metadata_1.parquet").unlink()                                     # lost
    changed = scores / "metadata_0.parquet"                                      # replaced by other bytes
    pq.write_table(pq.read_table(changed).slice(0, 10), changed)
    size = changed.stat().st_size
    recorded = json.loads((state(scores) / "shards" / "metadata_0.json").read_text())["parquet"]["bytes"]
    capsys.readouterr()
    out, card = tmp_path / "out", tmp_path / "card"
    for command, argv in (("filter", ["filter", "--scores", str(scores), "--output", str(out)]),
                          ("card", ["card", "--scores", str(scores), "--stats", stats, "--output", str(card)])):
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith(f"wclip {command}: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0] == (f"wclip {command}: error: the scores folder {scores} is incomplete: 2 shard(s) recorded "
                            f"as scored have no score file or one of another size (metadata_0.parquet {size} bytes, "
                            f"{recorded} recorded; metadata_1.parquet missing); rerun the `wclip score` command "
                            f"that wrote the folder to rescore them")
    assert not out.exists() and not card.exists()
    # as the message says: the score command rescores exactly those two, then filter and card go ahead
    assert main(score) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["shards_done"], summary["shards_skipped"], summary["rows"]) == (2, 1, 120 + 90)
    assert main(["filter", "--scores", str(scores), "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 120 + 90
    assert main(["card", "--scores", str(scores), "--stats", stats, "--output", str(card), "--no-thumbnails"]) == 0
    assert json.loads((card / "card.json").read_text())["rows"] == 120 + 90
