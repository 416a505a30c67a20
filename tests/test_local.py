"""The local executor (pipeline/executors/local.py): the same outputs as on Ray, retries, a worker that dies, and a
command that never starts Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardkit import SCRIPT_PATH, clean_shards, marker_files, state, tiny_run

from pipeline.config import FitConfig, RayOptions, ScoreConfig
from pipeline.executors import uses_ray
from pipeline.flow import stage
from pipeline.runs.fit import fit
from pipeline.runs.score import score
from pipeline.whitening import StatsFile

PER_SHARD = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    refs = clean_shards(folder / "ref", shards=2, per_shard=40)
    targets = clean_shards(folder / "tgt", shards=4, per_shard=PER_SHARD, start=1000)
    stats = str(folder / "stats.safetensors")
    fit(FitConfig(run=tiny_run(refs, executor="local", max_in_flight=2), output=stats, components=8, holdout=0.2))
    return refs, targets, stats


def _score(targets, stats_path, out, **run):
    return score(ScoreConfig(run=tiny_run(targets, **run), stats_path=stats_path, output=str(out)),
                 StatsFile.load(stats_path))


def test_local_and_ray_executors_fit_and_score_the_same(corpus, tmp_path, ray_local):
    refs, targets, stats_path = corpus
    on_ray = str(tmp_path / "ray.safetensors")
    fit(FitConfig(run=tiny_run(refs, executor="ray"), output=on_ray, components=8, holdout=0.2))
    for tower, ws in StatsFile.load(stats_path).towers.items():
        other = StatsFile.load(on_ray).towers[tower]
        np.testing.assert_array_equal(ws.mean, other.mean)
        np.testing.assert_array_equal(ws.whitening, other.whitening)
        np.testing.assert_array_equal(ws.calibration, other.calibration)
    tables = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        summary = _score(targets, stats_path, out, executor=executor, max_in_flight=2)
        assert summary["rows"] == 4 * PER_SHARD and summary["status_counts"] == {"ok": 4 * PER_SHARD}
        tables[executor] = {p.name: pq.read_table(p).replace_schema_metadata(None)
                            for p in sorted(out.glob("*.parquet"))}
    assert sorted(tables["local"]) == ["00000.parquet", "00001.parquet", "00002.parquet", "00003.parquet"]
    for name, table in tables["local"].items():
        assert table.equals(tables["ray"][name]), name


def _dies(tmp_path, targets):
    """encode_shard, except that targets[0] kills its worker once and targets[1] every time."""
    real, flag = stage.encode_shard, tmp_path / "died-once"

    def encode_shard(url, run, st, sink, report=None):
        with open(tmp_path / "attempts.log", "a") as fh:
            fh.write(url + "\n")
        if url == targets[0] and not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if url == targets[1]:
            os._exit(3)
        return real(url, run, st, sink, report=report)
    return encode_shard


def test_a_worker_that_dies_costs_only_its_own_shard(corpus, tmp_path, monkeypatch):
    _, targets, stats_path = corpus
    # the workers are forked from this process: they run the patched function
    monkeypatch.setattr(stage, "encode_shard", _dies(tmp_path, targets))
    out = tmp_path / "scores"
    summary = _score(targets, stats_path, out, executor="local", max_in_flight=2, retries=1)
    assert summary["shards_done"] == 3 and summary["rows"] == 3 * PER_SHARD
    assert [f["shard"] for f in summary["failed"]] == [targets[1]]
    assert "the worker process died while reading this shard" in summary["failed"][0]["error"]
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00002.parquet", "00003.parquet"]
    assert len(marker_files(out)) == 3
    records = [json.loads(line) for line in (state(out) / "failures.jsonl").read_text().splitlines()]
    assert [r["shard"] for r in records] == [targets[1]]
    # each shard's rows once, in order
    for name in ("00000", "00002", "00003"):
        keys = pq.read_table(out / f"{name}.parquet", columns=["key"])["key"].to_pylist()
        assert len(keys) == len(set(keys)) == PER_SHARD
    # the shard that killed its worker every time ran alone for both of its charged attempts
    attempts = (tmp_path / "attempts.log").read_text().split()
    assert attempts.count(targets[1]) >= 2


def test_an_error_in_a_shard_is_retried_then_recorded(corpus, tmp_path, monkeypatch):
    _, targets, stats_path = corpus
    real, log = stage.encode_shard, tmp_path / "attempts.log"

    def flaky(url, run, st, sink, report=None):
        with open(log, "a") as fh:
            fh.write(url + "\n")
        if url == targets[2]:
            raise ValueError("this shard always fails")
        if url == targets[3] and log.read_text().split().count(url) == 1:
            raise OSError("a transient read error")
        return real(url, run, st, sink, report=report)

    monkeypatch.setattr(stage, "encode_shard", flaky)
    summary = _score(targets, stats_path, tmp_path / "scores", executor="local", max_in_flight=2, retries=2)
    assert summary["failed"] == [{"shard": targets[2], "error": "ValueError: this shard always fails"}]
    assert summary["shards_done"] == 3 and summary["rows"] == 3 * PER_SHARD
    attempts = log.read_text().split()
    assert attempts.count(targets[2]) == 3 and attempts.count(targets[3]) == 2


def test_auto_picks_ray_only_for_a_cluster_gpus_or_encoder_actors(monkeypatch, corpus):
    from pipeline.config import EncodeConfig, InputConfig
    from pipeline.executors import contract as executor

    _, targets, _ = corpus
    monkeypatch.setattr(executor, "_ray_running", lambda: False)
    monkeypatch.setattr(executor, "_cuda_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not uses_ray(tiny_run(targets))
    assert uses_ray(tiny_run(targets, ray=RayOptions(address="ray://head:10001")))
    assert uses_ray(tiny_run(targets, encoders=1))
    assert uses_ray(tiny_run(targets, encode=EncodeConfig(device="cuda")))
    assert uses_ray(tiny_run(targets, inputs=InputConfig(decode="gpu")))
    assert not uses_ray(tiny_run(targets, executor="local", encoders=1))  # asked for: refused later, see below
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert uses_ray(tiny_run(targets)) and not uses_ray(tiny_run(targets, executor="local"))
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(executor, "_cuda_available", lambda: True)
    assert uses_ray(tiny_run(targets)) and not uses_ray(tiny_run(targets, encode=EncodeConfig(device="cpu")))
    monkeypatch.setattr(executor, "_ray_running", lambda: True)  # a notebook or test session with Ray
    assert uses_ray(tiny_run(targets, encode=EncodeConfig(device="cpu")))


def test_the_local_executor_refuses_what_only_ray_has(corpus, tmp_path):
    _, targets, stats_path = corpus
    with pytest.raises(ValueError, match="--encoders and --decode gpu need --executor ray"):
        _score(targets, stats_path, tmp_path / "scores", executor="local", encoders=1)


def test_the_command_scores_without_starting_or_importing_ray(corpus, tmp_path):
    _, targets, stats_path = corpus
    out = tmp_path / "scores"
    script = ("import sys\nfrom pipeline.cli import main\n"
              f"rc = main(['score', '--input', {targets[0]!r}, '--stats', {stats_path!r}, '--output', {str(out)!r},"
              " '--no-progress'])\n"
              "assert 'ray' not in sys.modules, 'Ray was imported'\nsys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": SCRIPT_PATH}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["rows"] == PER_SHARD
    assert pq.read_table(out / "00000.parquet").num_rows == PER_SHARD


def _default_sigint():
    # as from a terminal: a test runner started in the background (`cmd &` in a script) has SIGINT ignored,
    # and its children would inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for_workers(tmp_path, corpus):
    import time

    import psutil

    _, targets, stats_path = corpus
    slow = f"pipe:sh -c 'sleep 60; cat {targets[0]}'"  # keeps a worker busy in its shard
    script = ("import sys\nfrom pipeline.cli import main\n"
              f"sys.exit(main(['score', '--input', {slow!r}, {targets[1]!r}, '--stats', {stats_path!r}, "
              f"'--output', {str(tmp_path / 'scores')!r}, '--no-progress']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": SCRIPT_PATH}, start_new_session=True,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 240
    while time.time() < deadline and not (state(tmp_path / "scores") / "shards" / "00001.json").exists():
        time.sleep(0.2)
    workers = [p for p in psutil.Process(proc.pid).children() if "python" in p.name().lower()]
    assert len(workers) == 2, workers
    return proc, workers


def test_ctrl_c_stops_the_workers_in_one_line(corpus, tmp_path):
    import psutil

    proc, workers = _start_and_wait_for_workers(tmp_path, corpus)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    # within seconds: the `pipe:` command stops too (it holds the pipes communicate() waits for; it would
    # sleep 60 s more if the workers passed an ignored SIGINT on to it)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "wclip score: interrupted; rerun the same command to resume." in err and "Traceback" not in err, err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_workers_end_when_the_command_is_killed(corpus, tmp_path):
    import psutil

    proc, workers = _start_and_wait_for_workers(tmp_path, corpus)
    try:
        proc.kill()  # SIGKILL: no handler runs in the command
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, "orphaned workers"
    finally:  # the `pipe:` command a killed worker leaves behind (it ends when it next writes to the pipe)
        os.killpg(proc.pid, signal.SIGKILL)


def test_one_failure_line_for_every_executor():
    from pipeline.executors import failure_line

    error = "OSError: [Errno 5] Input/output error\nTraceback (most recent call last): ..."
    assert failure_line(2, error, "s3://b/00007.tar") == \
        "shard failed after 2 retries: s3://b/00007.tar: OSError: [Errno 5] Input/output error"
    assert failure_line(0, error) == "failed after 0 retries: OSError: [Errno 5] Input/output error"
    assert failure_line(1, "") == "failed after 1 retries: "


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_shard_task_is_sent_its_own_url_not_the_jobs_list(corpus, tmp_path, monkeypatch, executor, request):
    """A task's config carries one URL: with the job's whole list, each of 10^5 tasks pickled 4.4 MB."""
    import pickle

    from pipeline.executors import contract as executor_module

    if executor == "ray":
        request.getfixturevalue("ray_local")
    _, targets, stats_path = corpus
    sent = []
    module = __import__(f"pipeline.executors.{executor}", fromlist=["shard_config"])

    def recording(run, url):
        config = executor_module.shard_config(run, url)
        sent.append((url, config.shards, len(pickle.dumps(config))))
        return config

    monkeypatch.setattr(module, "shard_config", recording)
    summary = _score(targets, stats_path, tmp_path / "scores", executor=executor, max_in_flight=2)
    assert summary["rows"] == 4 * PER_SHARD and sorted(u for u, _, _ in sent) == sorted(targets)
    assert all(shards == (url,) for url, shards, _ in sent)
    many = tiny_run([f"/data/{i:06d}.tar" for i in range(100_000)])
    assert len(pickle.dumps(executor_module.shard_config(many, many.shards[7]))) < 4096 < len(pickle.dumps(many))


def test_a_job_report_counts_results_without_keeping_them():
    from pipeline.executors import JobReport

    report = JobReport(skipped=3)
    results = [{"summary": {"shard": f"s{i}.tar", "rows": 10 + i, "status_counts": {"ok": 9 + i, "decode": 1},
                            "damage": "truncated after 9 members" if i == 2 else None, "extra": "x" * 1000}}
               for i in range(4)]
    for result in results:
        report.add(result)
    report.failed.append(("s9.tar", "OSError: gone"))
    report.elapsed = 2.0
    assert report.summary() == {
        "rows": 46, "status_counts": {"decode": 4, "ok": 42}, "shards_done": 4, "shards_skipped": 3,
        "failed": [{"shard": "s9.tar", "error": "OSError: gone"}],
        "damaged": [("s2.tar", "truncated after 9 members")], "elapsed_s": 2.0, "samples_per_s": 23.0}
    assert not any(r["summary"] is v or r is v for r in results for v in vars(report).values())


def test_file_maps_on_threads_are_bounded_retried_and_kept_in_input_order(caplog):
    """The one loop (pipeline/executors/loop.py) as the local executor's file maps run it."""
    import threading
    import time
    from collections import Counter

    from pipeline.executors import summary_rows
    from pipeline.executors.local import map_on_threads

    lock, state, calls = threading.Lock(), {"now": 0, "peak": 0}, Counter()

    def task(x):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            calls[x] += 1
        try:
            time.sleep(0.02)
            if x == 3:
                raise ValueError("three always fails")
            if x == 5 and calls[x] == 1:
                raise OSError("a transient read error")
            return {"summary": {"rows": 10 * x}}
        finally:
            with lock:
                state["now"] -= 1

    with caplog.at_level("INFO", logger="wclip"):
        outcomes = map_on_threads(task, list(range(8)), desc="files", max_retries=2, max_in_flight=2,
                                  progress=False, samples=summary_rows)
    assert [o.item for o in outcomes] == list(range(8))
    assert [o.ok for o in outcomes] == [True, True, True, False, True, True, True, True]
    assert outcomes[3].error == "ValueError: three always fails" and outcomes[3].result is None
    assert [o.result["summary"]["rows"] for o in outcomes if o.ok] == [0, 10, 20, 40, 50, 60, 70]
    assert calls[3] == 3 and calls[5] == 2 and sum(calls.values()) == 11
    assert state["peak"] == 2
    lines = [r.getMessage() for r in caplog.records]
    assert "failed after 2 retries: ValueError: three always fails" in lines
    assert "files: 8/8 tasks, 250 samples" in lines[-1]  # failed items count on the bar, without samples


def test_one_place_chooses_and_ray_starts_only_when_a_task_runs(tmp_path, monkeypatch):
    from dataclasses import replace

    from pipeline.config import FilterConfig
    from pipeline.executors import local_cpus, open_executor
    from pipeline.executors import ray as ray_executor
    from pipeline.executors.local import LocalExecutor

    def no_session(options):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_executor, "ray_session", no_session)
    cfg = FilterConfig(str(tmp_path / "scores"), str(tmp_path / "out"), executor="ray")
    with open_executor(cfg) as executor:  # e.g. `wclip filter` resumed with every copy done
        assert isinstance(executor, ray_executor.RayExecutor)
    with pytest.raises(AssertionError, match="Ray was started"), open_executor(cfg) as executor:
        executor.map(str, [1])
    with open_executor(replace(cfg, executor="local")) as executor:
        assert isinstance(executor, LocalExecutor) and executor.slots == local_cpus(None)
        assert [(o.ok, o.result) for o in executor.map(str, [1, 2])] == [(True, "1"), (True, "2")]
