"""One run writes a scores folder at a time: runs started on it at the same moment (real `python -m pipeline
score` processes released together, threads racing on the claim) leave it to exactly one; the others are
refused in one line before they write anything; a holder killed with SIGKILL leaves the folder free."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shardkit import SCRIPT_PATH, clean_shards, state
from test_embeddings import _run, write_clip_retrieval

from pipeline.cli import main
from pipeline.config import EmbeddingFitConfig
from pipeline.errors import ConfigError
from pipeline.runs.fit import fit
from pipeline.scores.folder import claim_folder
from pipeline.whitening import StatsFile

BUSY = "is being written by another `wclip score`"
RUNS = 8


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """A clip-retrieval folder and two fits of it (different seeds: different stats digests)."""
    root = tmp_path_factory.mktemp("claim")
    folder = write_clip_retrieval(root / "laion")
    stats = []
    for seed in (0, 5):
        path = str(root / f"stats{seed}.safetensors")
        fit(EmbeddingFitConfig(run=_run([folder]), output=path, components=12, holdout=0.2, seed=seed))
        stats.append(path)
    return folder, stats


def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


RELEASED = """
import sys, time
from pathlib import Path
import pipeline.cli, pipeline.runs.score, pipeline.sources.embeddings  # imported before the start signal
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.001)
sys.exit(pipeline.cli.main(sys.argv[2:]))
"""


def test_simultaneous_starts_leave_the_folder_to_one_run(embeddings, tmp_path):
    folder, stats = embeddings
    out, go = tmp_path / "scores", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=SCRIPT_PATH)
    procs = [subprocess.Popen([sys.executable, "-c", RELEASED, str(go), "score", "--embeddings", str(folder),
                               "--stats", stats[i % 2], "--output", str(out), "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(RUNS)]
    time.sleep(8)  # every process imported and polling
    go.touch()
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    owner = json.loads((state(out) / "run.json").read_text())["stats_digest"]
    won = [i for i in range(RUNS) if _digest(stats[i % 2]) == owner]
    lost = [i for i in range(RUNS) if i not in won]
    assert len(won) == len(lost) == RUNS // 2
    for i in lost:                                 # the other fit: refused in one line, exit 2
        rc, _, err = results[i]
        assert rc == 2, err
        lines = [line for line in err.splitlines() if line.startswith("wclip score: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert BUSY in lines[0] or "holds scores made with" in lines[0], err
    # the owner's runs: one scored everything, the others were refused while it ran (or found nothing to do)
    summaries = [json.loads(results[i][1][results[i][1].index("{"):]) for i in won if results[i][0] == 0]
    assert all(BUSY in results[i][2] for i in won if results[i][0] != 0)
    assert sorted(s["shards_done"] for s in summaries)[-1] == 3
    assert sum(s["shards_done"] for s in summaries) == 3
    # every file in the folder is the owner's, and every marker records its file's size
    for name in ("metadata_0", "metadata_1", "metadata_2"):
        made = json.loads(pq.read_schema(out / f"{name}.parquet").metadata[b"wclip"])
        marker = json.loads((state(out) / "shards" / f"{name}.json").read_text())
        assert made["stats_digest"] == marker["provenance"]["stats_digest"] == owner
        assert marker["parquet"]["bytes"] == (out / f"{name}.parquet").stat().st_size
    assert sorted(p.name for p in out.iterdir()) == ["metadata_0.parquet", "metadata_1.parquet", "metadata_2.parquet"]


def test_threads_racing_on_the_claim_let_exactly_one_hold_it(tmp_path):
    out = str(tmp_path / "scores")
    start = threading.Barrier(16)
    held, refused = [], []

    def claim(i):
        start.wait()
        try:
            with claim_folder(out, f"/fits/{i % 2}.safetensors"):
                held.append(i)
                time.sleep(0.5)
        except ConfigError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) == 1 and len(refused) == 15
    assert all(m.startswith(f"--output {out} {BUSY} (") and "\n" not in m for m in refused)
    assert any(f"pid {os.getpid()} on " in m for m in refused)
    with claim_folder(out, "/fits/0.safetensors"):  # released: the next run holds it
        pass
    assert not os.path.exists(out) and os.listdir(state(out)) == ["lock"]  # the lock lives beside the folder


HOLD = """
import sys, time
from pipeline.scores.folder import claim_folder
from pipeline.whitening import StatsFile
with claim_folder(sys.argv[1], "/fits/a.safetensors"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_holder_killed_with_sigkill_leaves_the_folder_free(tmp_path):
    out = str(tmp_path / "scores")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, out], env=dict(os.environ, PYTHONPATH=SCRIPT_PATH),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=rf"{BUSY} \(pid {proc.pid} on .*, since .*, stats /fits/a\.safetensors\)"
                                              r"; wait for it to end, then rerun this command"):
            with claim_folder(out, "/fits/b.safetensors"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with claim_folder(out, "/fits/b.safetensors"):
        pass


def test_both_score_paths_are_refused_on_a_held_folder_before_writing(embeddings, tmp_path, capsys):
    folder, stats = embeddings
    out = tmp_path / "scores"
    shard = clean_shards(tmp_path, shards=1, per_shard=2)[0]
    tar_stats = str(tmp_path / "tar.safetensors")  # stats as a fit on tar shards records them
    StatsFile(towers=StatsFile.load(stats[0]).towers, metadata={
        "model_identity": {"model": "wclip-tiny", "weights": "random-init:seed=0"}, "normalize": True}).save(tar_stats)
    with claim_folder(str(out), stats[0]):
        assert main(["score", "--embeddings", str(folder), "--stats", stats[1], "--output", str(out)]) == 2
        assert BUSY in capsys.readouterr().err
        assert main(["score", "--input", shard, "--stats", tar_stats, "--output", str(out), "--random-init",
                     "--executor", "local"]) == 2
        assert BUSY in capsys.readouterr().err
        # --dry-run writes nothing and claims nothing
        assert main(["score", "--embeddings", str(folder), "--stats", stats[0], "--output", str(out),
                     "--dry-run"]) == 0
    assert not out.exists() and sorted(p.name for p in state(out).rglob("*")) == ["lock"]
