"""Progress by samples within a shard (issue #29 item 4): a shard's task reports the samples it has done as it
goes, the driver shows them on the bar and, without a terminal, in periodic log lines; every line counts what
was done (the filter's copy line the samples it copied)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from shardkit import SCRIPT_PATH, clean_shards, tiny_run

from pipeline import progress
from pipeline.config import FitConfig, ScoreConfig
from pipeline.progress import Progress, TaskReport
from pipeline.runs.fit import fit
from pipeline.runs.score import score
from pipeline.whitening import StatsFile

PER_SHARD = 48
LINE = re.compile(r"score: (\d+)/1 shards, (\d+) samples, ([\d.]+) samples/s")

# `slow_cat.py PARTS PAUSE FILE` writes FILE to stdout in PARTS pieces with PAUSE seconds after each: a shard
# arriving slowly via `pipe:` (FILE last: it names the shard's outputs)
SLOW_CAT = """import sys, time
data = open(sys.argv[3], "rb").read()
step = -(-len(data) // int(sys.argv[1]))
for start in range(0, len(data), step):
    sys.stdout.buffer.write(data[start:start + step])
    sys.stdout.buffer.flush()
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress")
    refs = clean_shards(folder / "ref", shards=1, per_shard=40)
    targets = clean_shards(folder / "tgt", shards=2, per_shard=PER_SHARD, start=1000)
    stats = str(folder / "stats.safetensors")
    fit(FitConfig(run=tiny_run(refs, executor="local"), output=stats, components=8, holdout=0.2))
    (folder / "slow_cat.py").write_text(SLOW_CAT)
    return folder, targets, stats


def _slow(folder, tar: str, parts: int = 4, pause: float = 1.5) -> str:
    return f"pipe:{sys.executable} {folder / 'slow_cat.py'} {parts} {pause} {tar}"


def _within_shard(lines: list) -> list:
    """The sample counts of the lines printed while the shard was still running (0/1 shards)."""
    counts = []
    for line in lines:
        match = LINE.search(line)
        if match and match.group(1) == "0":
            counts.append(int(match.group(2)))
            assert int(match.group(2)) == 0 or float(match.group(3)) > 0, line
    return counts


def test_the_command_logs_growing_sample_counts_within_a_slow_shard(corpus, tmp_path):
    folder, targets, stats = corpus
    out = tmp_path / "scores"
    # the real command, stderr not a terminal; only the log interval is shortened (15 s by default)
    script = ("import sys\nimport pipeline.progress as progress\nfrom pipeline.cli import main\n"
              "progress.LOG_EVERY_S = 0.5\n"
              f"sys.exit(main(['score', '--input', {_slow(folder, targets[0])!r}, '--stats', {stats!r}, "
              f"'--output', {str(out)!r}, '--chunk-size', '8', '--executor', 'local']))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": SCRIPT_PATH})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    counts = _within_shard(lines)
    grown = [n for n in counts if 0 < n < PER_SHARD]
    assert len(set(grown)) >= 2, lines  # the count grew while the shard was read
    assert counts == sorted(counts), lines
    assert all(n % 8 == 0 for n in grown), lines  # whole chunks of assembled rows, never more than done
    assert "score: 1/1 shards, 48 samples" in [LINE.search(x).group(0).rsplit(",", 1)[0]
                                                for x in lines if LINE.search(x)][-1]
    assert json.loads(done.stdout.strip().splitlines()[-1])["rows"] == PER_SHARD
    assert pq.read_table(out / "00000.parquet").num_rows == PER_SHARD


def test_ray_shard_tasks_report_their_samples_as_they_go(corpus, tmp_path, ray_local, monkeypatch, caplog):
    folder, targets, stats = corpus
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.3)
    run = tiny_run([_slow(folder, targets[0])], chunk_size=8, executor="ray")
    with caplog.at_level(logging.INFO, logger="wclip"):
        summary = score(ScoreConfig(run=run, stats_path=stats, output=str(tmp_path / "scores")),
                        StatsFile.load(stats))
    assert summary["rows"] == PER_SHARD
    lines = [r.getMessage() for r in caplog.records]
    counts = _within_shard(lines)
    assert len({n for n in counts if 0 < n < PER_SHARD}) >= 2, lines
    assert counts == sorted(counts), lines
    assert LINE.search(lines[-1]) and "score: 1/1 shards, 48 samples" in lines[-1], lines


def test_a_finished_task_counts_once_and_lines_count_what_was_done(caplog):
    with caplog.at_level(logging.INFO, logger="wclip"), \
            Progress(total=3, desc="score", initial=1, enabled=False, log_every=0) as bar:
        bar.running({0: 16, 1: 8})
        assert bar.samples_done() == 24
        assert caplog.records[-1].getMessage().startswith("score: 1/3 shards, 24 samples, ")
        assert "ETA" not in caplog.records[-1].getMessage()  # no shard of this run has finished yet
        bar.update(1, samples=20, key=0)  # task 0 ends with 20 rows: its running 16 are not counted again
        assert bar.samples_done() == 28
        assert re.fullmatch(r"score: 2/3 shards, 28 samples, [\d.]+ samples/s, ETA \d+s",
                            caplog.records[-1].getMessage())
        bar.running({})  # task 1 failed an attempt: its samples are no longer done
        assert bar.samples_done() == 20
    with caplog.at_level(logging.INFO, logger="wclip"), \
            Progress(total=2, desc="assemble", enabled=False, unit="tasks", samples=False) as bar:
        bar.update(1)
        bar.update(1)
    assert caplog.records[-1].getMessage() == "assemble: 2/2 tasks"  # no "0 samples" for tasks without samples


def test_a_task_report_is_rate_limited_and_sends_the_latest_count(monkeypatch):
    sent, now = [], [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    report = TaskReport(sent.append, every=0.5)
    report(8)      # the first at once
    report(16)     # too soon
    now[0] += 0.6
    report(24)
    assert sent == [8, 24]
    every_chunk = TaskReport(sent.append, every=0)
    every_chunk(32)
    every_chunk(40)
    assert sent == [8, 24, 32, 40]


def test_the_filter_copy_line_counts_the_samples_it_copied(corpus, tmp_path):
    _, targets, stats = corpus
    scores = tmp_path / "scores"
    score(ScoreConfig(run=tiny_run(targets, executor="local"), stats_path=stats, output=str(scores)),
          StatsFile.load(stats))
    out = tmp_path / "kept"
    argv = [sys.executable, "-m", "pipeline", "filter", "--scores", str(scores), "--output", str(out),
            "--keep-fraction", "clip_score=0.5", "--input", *targets, "--samples-per-shard", "10",
            "--executor", "local", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": SCRIPT_PATH}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "filter.json").read_text())
    kept, tasks = report["kept"], report["shards"]["tasks"]
    assert kept == PER_SHARD and report["shards"]["copied"] == kept
    assert f"copy: {tasks}/{tasks} tasks, {kept} samples, " in done.stderr, done.stderr
    # resume after losing one output shard: its task runs again and copies that shard's 10 samples only
    (out / "shards" / "00000.tar").unlink()
    (out / "shards" / "00000_stats.json").unlink()
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert "copy: 1/1 tasks, 10 samples, " in again.stderr, again.stderr
