"""Shards named by relative paths on the command line are recorded absolute in the scores, so `wclip card` run
from another folder still reads its thumbnails (the real commands: fit, score, card)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from shardkit import clean_shards

from pipeline.cli import main

MODEL = ("--model", "wclip-tiny", "--random-init", "--executor", "local", "--no-progress")


def test_card_from_another_folder_finds_the_shards_scored_by_relative_paths(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "data").mkdir(parents=True)
    elsewhere.mkdir()
    clean_shards(work / "data", shards=2, per_shard=6)
    monkeypatch.chdir(work)
    assert main(["fit", "--input", "data/{00000..00001}.tar", "--output", "stats.safetensors", *MODEL]) == 0
    assert main(["score", "--input", "data/", "--stats", "stats.safetensors", "--output", "scores/", *MODEL]) == 0
    shards = set(pq.read_table(work / "scores" / "00000.parquet")["shard"].to_pylist())
    assert shards == {str(work / "data" / "00000.tar")}

    monkeypatch.chdir(elsewhere)
    assert main(["card", "--scores", str(work / "scores"), "--stats", str(work / "stats.safetensors"),
                 "--output", "card", "--extremes", "3"]) == 0
    card = json.loads((elsewhere / "card" / "card.json").read_text())
    assert not [n for n in card["notes"] if "thumbnail" in n or "not found" in n], card["notes"]
    assert {"least_likely.png", "most_likely.png"} <= set(card["plots"].values()) | set(card["plots"]), card["plots"]
