"""wclip on what a peer tool really writes: img2dataset 1.47 (from PyPI, in a virtualenv of its own under
``.bench/``) downloads images from a loopback HTTP server in its three output formats, and wclip scores each
of them and filters the shards it wrote. Slow: the first run installs img2dataset (about a minute); without
PyPI the test is skipped, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardkit import http_server, image_bytes, tiny_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 14
MISSING = {3}  # the server answers 404
NOT_AN_IMAGE = {8}  # the server sends bytes no decoder reads
FORMATS = ("webdataset", "files", "parquet")


def _img2dataset() -> Path:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from peer_env import PeerSetupError, peer_python
    finally:
        sys.path.pop(0)
    try:
        return peer_python("img2dataset", ("img2dataset==1.47.0",), check="import img2dataset")
    except PeerSetupError as exc:
        pytest.skip(f"img2dataset could not be installed: {exc}")


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """img2dataset's outputs for one URL list, in each of its formats: {format: folder}, and the list."""
    py = _img2dataset()
    root = tmp_path_factory.mktemp("img2dataset")
    pictures = {i: image_bytes(i, size=(48 + 4 * i, 40)) for i in range(IMAGES)}

    def respond(handler):
        i = int(handler.path.strip("/").split(".")[0])
        if i in MISSING:
            handler.send_error(404)
            return
        body = b"this is not an image" if i in NOT_AN_IMAGE else pictures[i]
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    outputs = {}
    with http_server(respond) as base:
        urls = pa.table({"url": [f"{base}/{i}.jpg" for i in range(IMAGES)],
                         "caption": [f"a gradient picture number {i}" for i in range(IMAGES)],
                         "uid": [f"{i + 1:032x}" for i in range(IMAGES)]})
        pq.write_table(urls, root / "urls.parquet")
        for fmt in FORMATS:
            out = root / fmt
            cmd = [str(py.parent / "img2dataset"), "--url_list", str(root / "urls.parquet"), "--input_format",
                   "parquet", "--url_col", "url", "--caption_col", "caption", "--save_additional_columns",
                   '["uid"]', "--output_format", fmt, "--output_folder", str(out), "--processes_count", "1",
                   "--thread_count", "4", "--image_size", "64", "--number_sample_per_shard", "5",
                   "--distributor", "multiprocessing", "--retries", "0", "--timeout", "5",
                   "--enable_wandb", "False"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                                  env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
            assert done.returncode == 0, done.stderr[-3000:]
            outputs[fmt] = out
    return outputs, urls.to_pylist()


def _recorded(folder: Path) -> dict:
    """img2dataset's own record of a run: {key: row} from its per-shard parquet files (every URL it tried)."""
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("[0-9]*.parquet"))]).to_pylist()
    return {r["key"]: r for r in rows}


def _members(tars) -> dict:
    """{member name: bytes} of every member of ``tars``."""
    members = {}
    for tar in tars:
        with tarfile.open(tar) as tf:
            members.update({m.name: tf.extractfile(m).read() for m in tf.getmembers()})
    return members


def _score(inputs, input_format: str, stats_path: str, out: Path) -> dict:
    from pipeline.config import InputConfig, ScoreConfig
    from pipeline.runs.score import score
    from pipeline.whitening import StatsFile

    cfg = InputConfig(input_format=input_format)
    score(ScoreConfig(run=tiny_run(inputs, inputs=cfg, executor="local"), stats_path=stats_path, output=str(out)),
          StatsFile.load(stats_path))
    return {r["key"]: r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def test_img2dataset_outputs_score_alike_in_every_format_and_filter_back(downloaded, tmp_path):
    from pipeline.config import FitConfig
    from pipeline.flow.formats import expand_inputs
    from pipeline.runs.fit import fit

    outputs, listed = downloaded
    stats_json = [json.loads(p.read_text()) for p in sorted(outputs["webdataset"].glob("*_stats.json"))]
    assert sum(s["count"] for s in stats_json) == IMAGES
    assert sum(s["successes"] for s in stats_json) == IMAGES - len(MISSING | NOT_AN_IMAGE)
    wds = expand_inputs([str(outputs["webdataset"])], "webdataset")
    stats_path = str(tmp_path / "stats.safetensors")
    fit(FitConfig(run=tiny_run(wds, executor="local"), output=stats_path, components=4, holdout=0.2))

    scored = {}
    for fmt in FORMATS:
        inputs = wds if fmt == "webdataset" else expand_inputs([str(outputs[fmt])], fmt)
        scored[fmt] = _score(inputs, fmt, stats_path, tmp_path / f"scores-{fmt}")
        recorded = _recorded(outputs[fmt])
        ok = {k: r for k, r in recorded.items() if r["status"] == "success"}
        assert len(recorded) == IMAGES and len(ok) == IMAGES - len(MISSING | NOT_AN_IMAGE)
        rows = scored[fmt]
        if fmt == "parquet":  # its rows are the data: a URL that failed is a row without image bytes
            assert sorted(rows) == sorted(recorded)
            for key in set(recorded) - set(ok):
                assert rows[key]["status"] == "missing" and "no image" in rows[key]["error"], rows[key]
                assert rows[key]["image_loglik"] is None and rows[key]["uid"] == recorded[key]["uid"]
        else:  # the tars and folders hold the successes only
            assert sorted(rows) == sorted(ok)
        # one row per sample img2dataset kept, with its key, url, caption and the uid passed through
        for key in ok:
            row = rows[key]
            assert row["status"] == "ok" and row["url"] == ok[key]["url"] and row["uid"] == ok[key]["uid"]
            assert row["caption"] == ok[key]["caption"] and np.isfinite(row["image_loglik"])
    by_url = {r["url"]: r for r in listed}
    assert {by_url[r["url"]]["uid"] for r in scored["webdataset"].values()} == {
        f"{i + 1:032x}" for i in range(IMAGES) if i not in MISSING | NOT_AN_IMAGE}
    for fmt in ("files", "parquet"):  # the same JPEG bytes, so the same scores to the bit
        for key, row in scored["webdataset"].items():
            other = scored[fmt][key]  # (the parquet format's failed rows are not in the tars)
            assert [other[c] for c in ("image_loglik", "text_loglik", "clip_score")] == [
                row[c] for c in ("image_loglik", "text_loglik", "clip_score")]

    # filter img2dataset's shards, as a user would: the best half by image likelihood, in its own layout
    out = tmp_path / "kept"
    done = subprocess.run([sys.executable, "-m", "pipeline", "filter", "--scores", str(tmp_path / "scores-webdataset"),
                           "--output", str(out), "--keep-fraction", "image_loglik=0.5", "--input",
                           str(outputs["webdataset"]), "--executor", "local", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    best = sorted(scored["webdataset"].items(), key=lambda kv: -kv[1]["image_loglik"])
    kept = best[: len(best) // 2]
    uids = np.load(out / "uids.npy")
    assert sorted(f"{int(a):016x}{int(b):016x}" for a, b in uids) == sorted(r["uid"] for _, r in kept)
    members, originals = _members(sorted(out.rglob("*.tar"))), _members(wds)
    assert {name.split(".")[0] for name in members} == {key for key, _ in kept}
    for name, data in members.items():  # byte for byte what img2dataset wrote
        assert data == originals[name]
    for stats in sorted(out.rglob("*_stats.json")):
        record = json.loads(stats.read_text())
        assert record["successes"] == record["count"] > 0
