"""wclip card: refuses scores from two fits or models, a --stats that did not make the scores, and corrupt
Parquet (one line naming the file); draws captions with dollar signs literally; writes a README the Hugging
Face Hub reads (license, configs/data_files) and the dataset viewer loads."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardkit import state

from pipeline.cli import main
from pipeline.storage import sha256

SCORES = ("image_sqnorm", "image_loglik", "image_pvalue", "text_sqnorm", "text_loglik",
          "text_pvalue", "clip_score")
DOLLARS = ["costs $5 and $10", "it's $_$ fine", "a $\\frac{$ b", "100$ % sure$"]


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """Two stats files (different fits) and the scores the first one made."""
    from pipeline.whitening import StatsFile, WhiteningStats

    root = tmp_path_factory.mktemp("checks")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        towers = {t: WhiteningStats.fit(rng.normal(size=(200, 6)), holdout=0.25) for t in ("image", "text")}
        meta = {"model": "wclip-demo", "normalize": False}
        StatsFile(towers=towers, metadata=meta).save(root / f"{name}.safetensors")
    return root


def made(stats, model="wclip-demo") -> dict:
    return {"format": "wclip-scores/2", "stats_digest": sha256(stats), "stats_path": str(stats),
            "model": {"model": model, "weights": "builtin"}, "normalize": False}


def write_scores(path, n=20, provenance=None, captions=None, seed=0):
    rng = np.random.default_rng(seed)
    sq = rng.chisquare(6, n)
    cols = {"key": [f"{path.stem}-{i}" for i in range(n)], "shard": [f"/gone/{path.stem}.tar"] * n,
            "index": pa.array(range(n), pa.int32()), "caption": captions or [f"photo {i}" for i in range(n)],
            "status": ["ok"] * n, "error": pa.nulls(n, pa.string())}
    values = {"image_sqnorm": sq, "image_loglik": -0.5 * (6 * 1.8379 + sq), "image_pvalue": rng.random(n),
              "text_sqnorm": rng.chisquare(6, n), "text_loglik": -rng.chisquare(6, n),
              "text_pvalue": rng.random(n), "clip_score": rng.normal(0.3, 0.05, n)}
    cols.update({c: pa.array(values[c], pa.float32()) for c in SCORES})
    table = pa.table(cols)
    if provenance:
        table = table.replace_schema_metadata({b"wclip": json.dumps(provenance).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return table


def card(scores, stats, out, *extra):
    return main(["card", "--scores", str(scores), "--stats", str(stats), "--output", str(out),
                 "--no-thumbnails", "--extremes", "4", *extra])


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("wclip card: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_card_refuses_mixed_fits_and_stats_that_did_not_make_the_scores(fits, tmp_path, capsys):
    a, b = fits / "a.safetensors", fits / "b.safetensors"
    scores = tmp_path / "scores"
    write_scores(scores / "00000.parquet", provenance=made(a))
    write_scores(scores / "00001.parquet", provenance=made(b), seed=1)
    assert card(scores, a, tmp_path / "c1") == 2
    line = _err_line(capsys)
    assert "made by different fits or models" in line
    assert f"{scores / '00000.parquet'} by stats {sha256(a)[:12]} ({a}), model wclip-demo (builtin)" in line
    assert f"{scores / '00001.parquet'} by stats {sha256(b)[:12]} ({b})" in line
    assert not (tmp_path / "c1").exists()

    write_scores(scores / "00001.parquet", provenance=made(a, model="ViT-B-32"), seed=1)
    assert card(scores, a, tmp_path / "c1") == 2
    assert "model ViT-B-32 (builtin)" in _err_line(capsys)

    write_scores(scores / "00001.parquet", provenance=made(a), seed=1)
    assert card(scores, b, tmp_path / "c2") == 2          # the other fit's stats
    line = _err_line(capsys)
    assert f"--stats {b} (sha256 {sha256(b)[:12]}) did not make these scores" in line
    assert f"made by stats {sha256(a)[:12]} ({a})" in line and "pass that stats file as --stats" in line
    assert not (tmp_path / "c2").exists()

    assert card(scores, a, tmp_path / "c3") == 0           # the right stats
    assert json.loads((tmp_path / "c3" / "card.json").read_text())["rows"] == 40
    capsys.readouterr()

    old = tmp_path / "old"                                  # older wclip: accepted, with a note
    write_scores(old / "00000.parquet")
    assert card(old, b, tmp_path / "c4") == 0
    notes = json.loads((tmp_path / "c4" / "card.json").read_text())["notes"]
    assert any(n.startswith("no score file records what made it (00000.parquet") for n in notes)
    assert "no score file records what made it" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_card_names_a_corrupt_parquet_in_one_line(fits, tmp_path, capsys, damage):
    scores = tmp_path / "scores"
    write_scores(scores / "00000.parquet")
    bad = scores / "00001.parquet"
    write_scores(bad, n=300)
    data = bad.read_bytes()
    bad.write_bytes(b"\x00garbage\x00" * 50 if damage == "garbage" else data[: len(data) // 3])
    assert card(scores, fits / "a.safetensors", tmp_path / "card") == 2
    line = _err_line(capsys)
    assert line.startswith(f"wclip card: error: cannot read {bad} as Parquet (")


def test_captions_with_dollar_signs_are_drawn_literally(fits, tmp_path, monkeypatch):
    from pipeline.card import plots

    drawn = {}
    real_save = plots._save

    def keep(fig, out, name):
        drawn[name] = fig
        return real_save(fig, out, name)

    monkeypatch.setattr(plots, "_save", keep)
    a = fits / "a.safetensors"
    scores = tmp_path / "scores"
    table = write_scores(scores / "00000.parquet", n=12, provenance=made(a), captions=[f"ok {i}" for i in range(12)])
    order = np.argsort(table.column("image_loglik").to_numpy())      # least likely first
    captions = [f"ok {i}" for i in range(12)]
    for rank, i in enumerate(order[:4]):
        captions[i] = DOLLARS[rank]
    write_scores(scores / "00000.parquet", n=12, provenance=made(a), captions=captions)
    assert card(scores, a, tmp_path / "card") == 0
    card_json = json.loads((tmp_path / "card" / "card.json").read_text())
    assert [r["caption"] for r in card_json["extremes"]["least_likely"]] == DOLLARS
    labels = [ax.xaxis.label for ax in drawn["least_likely.png"].axes]
    assert [label.get_text().split("\n")[0] for label in labels] == ["costs $5 and $10", "it's $_$ fine",
                                                                     "a $\\frac{$ b", "100$ % sure$"]
    assert not any(label.get_parse_math() for label in labels)
    assert (tmp_path / "card" / "least_likely.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_header_has_license_and_configs_the_hub_reads(fits, tmp_path, capsys):
    from huggingface_hub import DatasetCard

    a = fits / "a.safetensors"
    repo = tmp_path / "repo"
    for s in range(2):
        write_scores(repo / "scores" / f"{s:05d}.parquet", n=15, provenance=made(a), seed=s)
    (state(repo / "scores") / "shards").mkdir(parents=True)
    (state(repo / "scores") / "shards" / "00000.json").write_text("{}")   # wclip's bookkeeping
    assert card(repo / "scores", a, repo, "--license", "cc-by-4.0") == 0
    hub = DatasetCard.load(repo / "README.md")
    header = hub.data.to_dict()
    assert header["license"] == "cc-by-4.0"
    assert header["configs"] == [{"config_name": "default",
                                  "data_files": [{"split": "train", "path": "scores/*.parquet"}]}]
    assert "## Data files" in hub.text and "reads `scores/*.parquet`" in hub.text

    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(str(repo), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.num_rows == 30 and {"key", "image_loglik", "clip_score"} <= set(loaded.column_names)

    # scores elsewhere: copied into the card folder under the scores folder's name, which the glob names; the
    # license defaults to "unknown"
    other = tmp_path / "kept"
    write_scores(other / "00000.parquet", provenance=made(a))
    assert card(other, a, tmp_path / "card") == 0
    hub = DatasetCard.load(tmp_path / "card" / "README.md")
    assert hub.data.to_dict()["license"] == "unknown"
    assert hub.data.to_dict()["configs"][0]["data_files"] == [{"split": "train", "path": "kept/*.parquet"}]
    assert (tmp_path / "card" / "kept" / "00000.parquet").read_bytes() == (other / "00000.parquet").read_bytes()
    assert f"hf upload REPO_ID {tmp_path / 'card'} . --repo-type dataset" in hub.text
    # --data-files: no copy, the README says where to upload the score files
    assert card(other, a, tmp_path / "card2", "--data-files", "data/scores-*.parquet") == 0
    assert DatasetCard.load(tmp_path / "card2" / "README.md").data.to_dict()["configs"][0]["data_files"] == \
        [{"split": "train", "path": "data/scores-*.parquet"}]
    assert not (tmp_path / "card2" / "kept").exists()
    assert f"hf upload REPO_ID {other} data --repo-type dataset --include '*.parquet'" in \
        (tmp_path / "card2" / "README.md").read_text()
    capsys.readouterr()

    assert card(other, a, tmp_path / "card3", "--license", "MIT License") == 2
    assert "--license must be a Hugging Face license id" in _err_line(capsys)
    assert card(other, a, tmp_path / "card3", "--data-files", "../kept/*.parquet") == 2
    assert "--data-files must be a glob relative to the card's README" in _err_line(capsys)
    assert not (tmp_path / "card3").exists()


def _upload_line(readme: str) -> str:
    import re

    found = re.findall(r"`(hf upload [^`]+)`", readme)
    assert len(found) == 1, found
    return found[0]


def test_the_card_folder_publishes_as_written(fits, tmp_path, monkeypatch, capsys):
    """The README's command (relative paths, scores beside the card): the card folder is the dataset repository;
    the Hub's data_files, resolved in it as the Hub does, load exactly the score rows; the upload line is one
    the real `hf` command accepts; a rerun follows the scores; a file the card did not copy is never replaced."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from huggingface_hub.utils import filter_repo_objects

    datasets = pytest.importorskip("datasets")
    a = fits / "a.safetensors"
    monkeypatch.chdir(tmp_path)
    for s in range(3):
        write_scores(Path("scores") / f"{s:05d}.parquet", n=10 + s, provenance=made(a), seed=s)
    (state(tmp_path / "scores")).mkdir()
    (state(tmp_path / "scores") / "run.json").write_text("{}")   # wclip's bookkeeping: not data
    assert card("scores/", a, "card/", "--license", "cc-by-4.0") == 0
    assert "copied the 3 score files to card/scores" in capsys.readouterr().err
    readme = (tmp_path / "card" / "README.md").read_text()
    loaded = datasets.load_dataset(str(tmp_path / "card"), split="train", cache_dir=str(tmp_path / "hf1"))
    assert loaded.num_rows == 33 and sorted(set(loaded["key"]))[:2] == ["00000-0", "00000-1"]

    line = _upload_line(readme)
    assert line == "hf upload REPO_ID card/ . --repo-type dataset --exclude '*.wclip/*'"
    argv = shlex.split(line.replace("REPO_ID", "someone/scores"))
    hf = Path(sys.executable).parent / "hf"
    out = subprocess.run([str(hf), *argv[1:]], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_none",
                              "HF_HOME": str(tmp_path / "hf-home")})
    assert out.returncode == 1 and "offline mode" in out.stderr and "No such option" not in out.stderr, out.stderr
    files = [str(p.relative_to(tmp_path / "card")) for p in (tmp_path / "card").rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=["*.wclip/*"]))
    assert {f for f in uploaded if f.endswith(".parquet")} == {f"scores/{s:05d}.parquet" for s in range(3)}
    assert {"README.md", "card.json"} <= uploaded

    # the scores change: a rerun copies them again and removes the copy of the score file that is gone
    (tmp_path / "scores" / "00002.parquet").unlink()
    write_scores(Path("scores") / "00001.parquet", n=4, provenance=made(a), seed=9)
    assert card("scores/", a, "card/") == 0
    assert sorted(p.name for p in (tmp_path / "card" / "scores").iterdir()) == ["00000.parquet", "00001.parquet"]
    loaded = datasets.load_dataset(str(tmp_path / "card"), split="train", cache_dir=str(tmp_path / "hf2"))
    assert loaded.num_rows == 14

    # a file the card did not copy, differing from the score file of its name: refused, kept as it was
    foreign = tmp_path / "other-card" / "scores" / "00000.parquet"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"mine")
    capsys.readouterr()
    assert card("scores/", a, "other-card/") == 2
    assert _err_line(capsys) == ("wclip card: error: other-card/scores/00000.parquet exists and was not copied "
                                 "there by `wclip card`: move it away (the card copies the score files to "
                                 "other-card/scores/), or pass another --output")
    assert foreign.read_bytes() == b"mine" and not (tmp_path / "other-card" / "README.md").exists()


def test_the_filters_shard_counts_are_each_tars():
    from pipeline.card.render import _filter_lines

    base = {"kept": 748, "rows": 1000, "eligible": 900, "conditions": []}
    lines = _filter_lines(dict(base, shards={"shards": 2, "samples": 748, "samples_per_shard": 400}))
    assert "New shards: 2 tars, 748 kept samples: 400 in each but the last, which holds 348." in lines
    lines = _filter_lines(dict(base, shards={"shards": 2, "samples": 800, "samples_per_shard": 400,
                                             "unreadable_count": 3}))
    assert "New shards: 2 tars of 400 kept samples (800 in all); 3 could not be read from their input shards and " \
           "are not in the tars." in lines
    lines = _filter_lines(dict(base, shards={"shards": 1, "samples": 348, "samples_per_shard": 400}))
    assert "New shards: 1 tar of 348 kept samples." in lines
