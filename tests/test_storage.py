"""Shards read from, and scores and stats written to, object storage and web servers, through fsspec.

S3 is moto's server mode (``ThreadedMotoServer``) on 127.0.0.1, a web server is ``http.server`` on
127.0.0.1; both run in threads of the test process. The jobs run in a subprocess (this file run as a
script) with its own private local Ray: Ray workers are separate processes that must see the S3
endpoint and dummy credentials, which is done by putting them in the subprocess's environment
(``FSSPEC_S3_ENDPOINT_URL``, ``AWS_*``) before its Ray starts; the session's ``ray_local`` fixture, which
may already be running without them, is not used. The subprocess runs the ``jobs`` entrypoints in order:

1. ``jobs.fit`` on ``s3://`` shards, writing the stats file to ``s3://`` (written locally, then uploaded);
2. ``jobs.score`` of the ``s3://`` shards with the ``s3://`` stats into an ``s3://`` folder;
3. the same shards scored from local files, and 4. from ``http://`` URLs, into local folders;
5. step 2 again, in the same process: nothing to do; then, after another client deleted one shard's
   outputs, once more: only that shard is redone;
6. ``jobs.score`` with a stats URL that does not exist: refused before any work.

The test then checks the rows and values. About a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardkit import SCRIPT_PATH

SHARDS, PER_SHARD = 3, 24
BIG_MEMBER = 6 << 20  # one sample carries 6 MiB: a shard larger than fsspec's HTTP/S3 read blocks
BUCKET = "wclip-test"
FLOAT_COLUMNS = ("image_sqnorm", "image_loglik", "image_pvalue", "text_sqnorm", "text_loglik",
                 "text_pvalue", "clip_score")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves a folder; like many static servers, it ignores Range headers."""

    def log_message(self, *args):
        pass

    def handle(self):
        with contextlib.suppress(ConnectionError):
            super().handle()


def _shard_names():
    return [f"{s:05d}" for s in range(SHARDS)]


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory):
    from moto.server import ThreadedMotoServer
    from shardkit import sample, write_shard

    work = tmp_path_factory.mktemp("remote")
    shards = work / "shards"
    shards.mkdir()
    for s in range(SHARDS):
        samples = [sample(s * PER_SHARD + j) for j in range(PER_SHARD)]
        if s == 0:
            samples[0][1]["bin"] = np.random.default_rng(0).bytes(BIG_MEMBER)
        write_shard(shards / f"{s:05d}.tar", samples)

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    web = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(shards)))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = _s3(endpoint)
        s3.mkdir(BUCKET)
        for name in _shard_names():
            s3.put_file(str(shards / f"{name}.tar"), f"{BUCKET}/shards/{name}.tar")

        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        env.update(CREDENTIALS, FSSPEC_S3_ENDPOINT_URL=endpoint, RAY_USAGE_STATS_ENABLED="0",
                   PYTHONUNBUFFERED="1", PYTHONPATH=SCRIPT_PATH)
        plan = {"work": str(work), "bucket": BUCKET,
                "http": f"http://127.0.0.1:{web.server_port}/{{00000..{SHARDS - 1:05d}}}.tar"}
        repo = Path(__file__).resolve().parents[1]
        proc = subprocess.run([sys.executable, __file__, json.dumps(plan)], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=400)
        if proc.returncode != 0:
            pytest.fail(f"remote-storage scenario failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
                        f"{proc.stderr[-8000:]}")
        report = json.loads((work / "report.json").read_text())
        yield work, s3, report
    finally:
        web.shutdown()
        moto.stop()


def _s3(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", token="testing", skip_instance_cache=True,
                             endpoint_url=endpoint)


def _read(fs_or_none, path: str):
    if fs_or_none is None:
        return pq.read_table(path)
    with fs_or_none.open(path, "rb") as fh:
        return pq.read_table(io.BytesIO(fh.read()))


def test_fit_reads_s3_shards_and_uploads_the_stats_file(remote_run, tmp_path):
    from pipeline.whitening import StatsFile

    _, s3, report = remote_run
    assert report["fit"]["rc"] == 0
    assert "uploaded s3://" in report["fit"]["stderr"]
    local = tmp_path / "stats.safetensors"
    s3.get_file(f"{BUCKET}/stats/ref.safetensors", str(local))
    stats = StatsFile.load(local)
    assert stats.metadata["n_reference"] == SHARDS * PER_SHARD
    assert stats.metadata["reference_shards"] == SHARDS
    assert stats.metadata["model_identity"] == {"model": "wclip-tiny", "weights": "random-init:seed=0"}
    staged = re.search(r"--output (\S+/wclip-fit-\w+)/ref\.safetensors", report["fit"]["stderr"])
    assert staged and not Path(staged.group(1)).exists(), "the local staging copy was not cleaned up"


def test_s3_and_http_scores_equal_local_scores(remote_run):
    work, s3, report = remote_run
    for run in ("s3", "local", "http"):
        assert report[run]["rc"] == 0, report[run]["stderr"][-2000:]
        assert report[run]["summary"]["rows"] == SHARDS * PER_SHARD
        assert report[run]["summary"]["status_counts"] == {"ok": SHARDS * PER_SHARD}
    for s, name in enumerate(_shard_names()):
        local = _read(None, str(work / "local" / f"{name}.parquet"))
        remote = _read(s3, f"{BUCKET}/scores/{name}.parquet")
        web = _read(None, str(work / "http" / f"{name}.parquet"))
        assert local.num_rows == PER_SHARD
        assert remote.column("shard").to_pylist() == [f"s3://{BUCKET}/shards/{name}.tar"] * PER_SHARD
        assert web.column("shard")[0].as_py().endswith(f"/{name}.tar")
        for other in (remote, web):
            for col in ("key", "index", "status", "uid", "caption"):
                assert other.column(col).to_pylist() == local.column(col).to_pylist(), (name, col)
            for col in FLOAT_COLUMNS:
                np.testing.assert_allclose(other.column(col).to_numpy(), local.column(col).to_numpy(),
                                           rtol=1e-6, atol=1e-6, err_msg=f"{name} {col}")
        marker = json.loads(s3.cat_file(f"{BUCKET}/scores/{name}.stats.json"))
        assert marker["rows"] == PER_SHARD and marker["status_counts"] == {"ok": PER_SHARD}
        assert not marker.get("damage")
    visible = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{BUCKET}/scores", refresh=True))
    assert visible == sorted([f"{n}.parquet" for n in _shard_names()] + [f"{n}.stats.json" for n in _shard_names()])


def test_rerun_on_s3_redoes_only_the_missing_shard(remote_run):
    """Reruns in one process: the second sees every shard done; after one shard's outputs are deleted
    by another client, the third redoes exactly that shard (no stale cached listing)."""
    _, s3, report = remote_run
    again = report["again"]
    assert again["rc"] == 0
    assert again["summary"]["shards_done"] == 0 and again["summary"]["shards_skipped"] == SHARDS
    resume = report["resume"]
    assert resume["rc"] == 0
    assert resume["summary"]["shards_done"] == 1 and resume["summary"]["shards_skipped"] == SHARDS - 1
    assert resume["summary"]["rows"] == PER_SHARD
    assert s3.exists(f"{BUCKET}/scores/00001.parquet") and s3.exists(f"{BUCKET}/scores/00001.stats.json")


def test_missing_remote_stats_file_is_refused_before_any_work(remote_run):
    work, _, report = remote_run
    missing = report["missing_stats"]
    assert missing["rc"] == 2
    assert f"cannot read the stats file s3://{BUCKET}/stats/missing.safetensors" in missing["stderr"]
    assert not (work / "never").exists()


# -- the scenario (runs in the subprocess) -------------------------------------------------------------
def _job(module, config: dict, work: Path, name: str) -> dict:
    """Run ``jobs.<module>`` in this process on a config written to ``work/<name>.yaml``."""
    import importlib

    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = importlib.import_module(f"jobs.{module}").main(["--config", str(path)])
    lines = [line for line in out.getvalue().splitlines() if line.startswith("{")]
    sys.stderr.write(err.getvalue())
    return {"rc": rc, "stderr": err.getvalue(), "summary": json.loads(lines[-1]) if lines else None}


def _scenario(plan: dict) -> None:
    import logging

    import fsspec
    import ray

    work, bucket = Path(plan["work"]), plan["bucket"]
    shards = [f"s3://{bucket}/shards/{{00000..{SHARDS - 1:05d}}}.tar"]
    stats = f"s3://{bucket}/stats/ref.safetensors"
    model = {"model": "wclip-tiny", "random_init": True, "chunk_size": 8, "no_progress": True}
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        report = {}
        report["fit"] = _job("fit", {"input": shards, "output": stats, "components": 8, "holdout": 0.2, **model},
                             work, "fit")
        score = {"stats": stats, "chunk_size": 8, "no_progress": True}
        s3_scores = {"input": shards, "output": f"s3://{bucket}/scores", **score}
        report["s3"] = _job("score", s3_scores, work, "score-s3")
        report["local"] = _job("score", {"input": [str(work / "shards")], "output": str(work / "local"), **score},
                               work, "score-local")
        report["http"] = _job("score", {"input": [plan["http"]], "output": str(work / "http"), **score},
                              work, "score-http")
        report["again"] = _job("score", s3_scores, work, "score-s3-again")  # everything done: lists the folder
        other = fsspec.filesystem("s3", skip_instance_cache=True)  # not the jobs' (cached) instance
        other.rm([f"{bucket}/scores/00001.parquet", f"{bucket}/scores/00001.stats.json"])
        report["resume"] = _job("score", s3_scores, work, "score-s3-resume")
        report["missing_stats"] = _job("score", {**s3_scores, "stats": f"s3://{bucket}/stats/missing.safetensors",
                                                 "output": str(work / "never")}, work, "score-missing")
        (work / "report.json").write_text(json.dumps(report))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    started = time.time()
    _scenario(json.loads(sys.argv[1]))
    print(f"scenario took {time.time() - started:.1f} s", file=sys.stderr)
