"""A scores folder is exactly the score rows, for every reader as it is: duckdb, polars, pyarrow datasets, pandas
and Hugging Face ``datasets`` read ``DIR`` itself, with the local likelihood's columns, with saved embeddings,
after a resume, and for scores of saved embeddings. wclip's bookkeeping lives beside it (``DIR.wclip/``); a folder
of wclip 0.1's layout (``DIR/.wclip/``) is moved there once, never mixed or lost."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardkit import clean_shards, state

from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.scores.layout import state_folder

RUN = ["--executor", "local", "--no-progress"]
ROWS = 30  # 3 target shards of 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A fit with clusters; target shards scored with saved embeddings (2 shards, then all 3: a resume), without
    them, and the saved embeddings scored again; each folder's score files as pyarrow reads them one by one."""
    root = tmp_path_factory.mktemp("readers")
    reference = clean_shards(root / "reference", 2, 24)
    targets = clean_shards(root / "targets", 3, 10, start=1000)
    stats = str(root / "stats.safetensors")
    assert main(["fit", "--input", *reference, "--model", "wclip-demo", "--output", stats, "--components", "8",
                 "--clusters", "2", *RUN]) == 0
    saved, plain, again = root / "saved", root / "plain", root / "again"
    score = ["score", "--stats", stats, *RUN]
    assert main([*score, "--input", *targets[:2], "--output", str(saved), "--save-embeddings"]) == 0
    assert main([*score, "--input", *targets, "--output", str(saved), "--save-embeddings"]) == 0
    assert main([*score, "--input", *targets, "--output", str(plain)]) == 0
    assert main([*score, "--embeddings", str(state(saved) / "embeddings"), "--output", str(again)]) == 0
    assert sorted(os.listdir(state(saved) / "shards")) == ["00000.json", "00001.json", "00002.json"]
    return root, stats, targets, {"saved": saved, "plain": plain, "again": again}


def _expected(folder):
    files = sorted(folder.glob("*.parquet"))
    assert [f.name for f in files] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    rows = [pq.read_table(f) for f in files]
    return sorted(k for t in rows for k in t["key"].to_pylist()), sum(float(np.nansum(t["image_loglik"])) for t in rows)


def _read(reader: str, folder, tmp_path):
    """``(keys, image_loglik)`` of the folder ``folder`` as ``reader`` reads it."""
    path = str(folder)
    if reader == "duckdb":
        import duckdb

        got = duckdb.sql(f"select key, image_loglik, image_local_loglik from read_parquet('{path}')").fetchall()
        return [r[0] for r in got], [r[1] for r in got]
    if reader in ("polars", "polars-scan"):
        import polars as pl

        frame = pl.read_parquet(path) if reader == "polars" else pl.scan_parquet(path).collect()
        assert "image_local_loglik" in frame.columns
        return frame["key"].to_list(), frame["image_loglik"].to_list()
    if reader == "pyarrow":
        import pyarrow.dataset as ds

        table = ds.dataset(path).to_table(columns=["key", "image_loglik", "image_local_loglik"])
        return table["key"].to_pylist(), table["image_loglik"].to_pylist()
    if reader == "pandas":
        import pandas as pd

        frame = pd.read_parquet(path)
        assert "image_local_loglik" in frame.columns
        return frame["key"].tolist(), frame["image_loglik"].tolist()
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=path, split="train", cache_dir=str(tmp_path / "hf"))
    assert "image_local_loglik" in loaded.column_names
    return loaded["key"], loaded["image_loglik"]


@pytest.mark.parametrize("reader", ["duckdb", "polars", "polars-scan", "pyarrow", "pandas", "datasets"])
@pytest.mark.parametrize("kind", ["saved", "plain", "again"])
def test_every_reader_reads_exactly_the_score_rows(folders, tmp_path, reader, kind):
    folder = folders[3][kind]
    keys, total = _expected(folder)
    got_keys, loglik = _read(reader, folder, tmp_path)
    assert len(got_keys) == len(keys) == ROWS
    assert sorted(got_keys) == keys
    assert float(np.nansum(np.asarray(loglik, dtype=np.float64))) == pytest.approx(total, rel=1e-6)
    assert sorted(os.listdir(folder)) == ["00000.parquet", "00001.parquet", "00002.parquet"]


def test_the_bookkeeping_lives_beside_the_folder(folders):
    root, _, _, made = folders
    saved = made["saved"]
    assert sorted(os.listdir(state(saved))) == ["embeddings", "lock", "run.json", "shards"]
    assert json.loads((state(saved) / "run.json").read_text())["layout"] == "DIR.wclip"
    assert sorted(os.listdir(state(saved) / "embeddings")) == ["img_emb", "metadata", "text_emb", "wclip.json"]
    assert sorted(os.listdir(state(made["again"]))) == ["lock", "run.json", "shards"]
    assert not list(root.rglob(".wclip"))


@pytest.mark.parametrize("given, expected", [
    ("scores", "scores.wclip"), ("scores/", "scores.wclip"), ("out/scores", "out/scores.wclip"),
    ("s3://bucket/scores/", "s3://bucket/scores.wclip"), ("memory://scores", "memory://scores.wclip"),
    ("s3://bucket/a/b", "s3://bucket/a/b.wclip"),
])
def test_the_state_folder_is_the_sibling(given, expected):
    assert state_folder(given) == expected


@pytest.mark.parametrize("root", ["/", "s3://bucket", "s3://bucket/", "memory://", "file:///"])
def test_a_folder_at_a_root_is_refused(root):
    with pytest.raises(ConfigError, match=r"is the root of its file system or bucket: wclip keeps a folder's "
                                          r"bookkeeping beside it \(DIR\.wclip\), so give a folder inside it"):
        state_folder(root)


def test_score_into_a_bucket_root_is_refused_in_one_line(folders, capsys):
    _, stats, targets, _ = folders
    assert main(["score", "--input", targets[0], "--stats", stats, "--output", "memory://", *RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err == ("wclip score: error: memory:// is the root of its file system or "
                                                  "bucket: wclip keeps a folder's bookkeeping beside it (DIR.wclip), "
                                                  "so give a folder inside it, e.g. memory://scores"), err


def _legacy(folder, where):
    """A copy of ``folder`` in wclip 0.1's layout: its bookkeeping inside, in ``.wclip/``."""
    shutil.copytree(folder, where)
    shutil.copytree(state(folder), where / ".wclip")
    return where


def test_a_folder_of_the_previous_layout_is_moved_once_and_resumes(folders, tmp_path, capsys, caplog):
    _, stats, targets, made = folders
    old = _legacy(made["saved"], tmp_path / "old")
    markers = sorted(os.listdir(old / ".wclip" / "shards"))
    with caplog.at_level(logging.INFO, logger="wclip"):
        assert main(["score", "--input", *targets, "--stats", stats, "--output", str(old), "--save-embeddings",
                     *RUN]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["shards_done"], summary["shards_skipped"]) == (0, 3)  # the markers moved with it: nothing redone
    assert f"moved wclip's bookkeeping of {old} from {old / '.wclip'} to {state(old)}" in caplog.text
    assert sorted(os.listdir(old)) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert sorted(os.listdir(state(old) / "shards")) == markers

    # a reader moves it too (filter, card, dedup list the score files the same way)
    read = _legacy(made["plain"], tmp_path / "read")
    assert main(["filter", "--scores", str(read), "--output", str(tmp_path / "f"), "--min", "clip_score=-1"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == ROWS
    assert not (read / ".wclip").exists() and (state(read) / "run.json").exists()


def test_two_records_are_refused_and_another_tools_folder_is_left_alone(folders, tmp_path, capsys):
    _, stats, targets, made = folders
    both = _legacy(made["plain"], tmp_path / "both")
    shutil.copytree(state(made["plain"]), state(both))
    assert main(["score", "--input", *targets, "--stats", stats, "--output", str(both), *RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{both} has wclip's bookkeeping twice: in {both / '.wclip'} (wclip 0.1's " \
                                          f"layout) and in {state(both)}" in err, err
    assert (both / ".wclip" / "run.json").exists()

    other = tmp_path / "other"  # a .wclip/ holding what wclip never kept there is not wclip's
    shutil.copytree(made["plain"], other)
    (other / ".wclip").mkdir()
    (other / ".wclip" / "plan.json").write_text("{}")
    assert main(["filter", "--scores", str(other), "--output", str(tmp_path / "f"), "--min", "clip_score=-1"]) == 0
    assert os.listdir(other / ".wclip") == ["plan.json"] and not state(other).exists()
