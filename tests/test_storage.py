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
6. ``jobs.score`` with a stats URL that does not exist: refused before any work;
7. ``wclip filter`` of the ``s3://`` scores into an ``s3://`` folder, resharding the ``s3://`` shards
   (``--input``), then the same command again (nothing left to copy);
8. ``wclip card`` of the filter's ``s3://`` kept rows, with the ``s3://`` stats file and filter folder,
   into an ``s3://`` folder (thumbnails read from the ``s3://`` shards).

The test then checks the rows, values and written objects. About a minute and a half on 2 cores.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardkit import SCRIPT_PATH

from pipeline.scores.layout import marker_path

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
        marker = json.loads(s3.cat_file(marker_path(f"{BUCKET}/scores", name)))
        assert marker["rows"] == PER_SHARD and marker["status_counts"] == {"ok": PER_SHARD}
        assert not marker.get("damage")
    visible = sorted(e["name"].rsplit("/", 1)[-1] for e in s3.ls(f"{BUCKET}/scores", detail=True, refresh=True)
                     if e["type"] == "file")
    assert visible == [f"{n}.parquet" for n in _shard_names()]          # the scores folder holds only scores


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
    assert s3.exists(f"{BUCKET}/scores/00001.parquet") and s3.exists(marker_path(f"{BUCKET}/scores", "00001"))


def test_missing_remote_stats_file_is_refused_before_any_work(remote_run):
    work, _, report = remote_run
    missing = report["missing_stats"]
    assert missing["rc"] == 2
    assert f"cannot read the stats file s3://{BUCKET}/stats/missing.safetensors" in missing["stderr"]
    assert not (work / "never").exists()


def _members(data: bytes) -> list:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_filter_reads_s3_scores_and_shards_and_writes_s3(remote_run):
    """``wclip filter --input``: kept rows, uids.npy, filter.json and new shards, all on S3, checked against
    an independent selection and the original shards' member bytes."""
    from pipeline.curate.uids import uid_to_int
    from pipeline.storage import is_temporary

    work, s3, report = remote_run
    run = report["filter"]
    assert run["rc"] == 0, run["stderr"][-3000:]
    result, again = run["summary"], report["filter_again"]
    out = f"{BUCKET}/filtered"
    assert again["rc"] == 0 and json.loads(s3.cat_file(f"{out}/filter.json")) == again["summary"]  # the last run's
    same = {k: v for k, v in result.items() if k not in ("shards", "elapsed_s")}
    assert {k: again["summary"][k] for k in same} == same
    assert result["scores"] == f"s3://{BUCKET}/scores" and result["kept_dir"] == f"s3://{out}/kept"

    names = _shard_names()
    scores = pa.concat_tables(_read(s3, f"{BUCKET}/scores/{n}.parquet") for n in names)
    clip = scores.column("clip_score").to_numpy().astype(np.float64)
    keys = np.array(scores.column("key").to_pylist())
    k = math.ceil(0.5 * len(clip))
    threshold = float(np.sort(clip)[::-1][k - 1])
    expected = set(keys[clip >= threshold].tolist())
    assert result["conditions"][0]["threshold"] == threshold and result["conditions"][0]["rank"] == k
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{out}/kept", refresh=True)) == \
        [f"{n}.parquet" for n in names]
    kept = pa.concat_tables(_read(s3, f"{out}/kept/{n}.parquet") for n in names)
    assert sorted(kept.column("key").to_pylist()) == sorted(expected) and result["kept"] == len(expected) >= k
    uids = np.load(io.BytesIO(s3.cat_file(f"{out}/uids.npy")))
    assert uids.dtype == np.dtype("u8,u8") and result["uids"]["path"] == f"s3://{out}/uids.npy"
    assert [uid_to_int(u) for u in uids] == sorted(int(u, 16) for u in kept.column("uid").to_pylist())

    shards = result["shards"]
    assert not shards["failed"] and shards["finished"] == shards["shards"] == math.ceil(len(expected) / 10)
    assert shards["tasks"] == 3 and shards["assembled"] > 0       # some shards were joined from pieces on S3
    written = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{out}/shards", refresh=True))
    tars = [f"{n:05d}.tar" for n in range(shards["shards"])]
    assert written == sorted(tars + [t[:-4] + "_stats.json" for t in tars] + [t[:-4] + ".parquet" for t in tars]
                             + [".wclip"])                        # img2dataset's layout; the plan under .wclip/
    assert [p.rsplit("/", 1)[-1] for p in s3.ls(f"{out}/shards/.wclip", refresh=True)] == ["plan.json"]
    want = [(name, data) for n in names for name, data in _members((work / "shards" / f"{n}.tar").read_bytes())
            if name.split(".", 1)[0] in expected]
    got = []
    for t in tars:
        data = s3.cat_file(f"{out}/shards/{t}")
        marker = json.loads(s3.cat_file(f"{out}/shards/{t[:-4]}_stats.json"))
        assert marker["sha256"] == hashlib.sha256(data).hexdigest() and marker["bytes"] == len(data)
        members = _members(data)
        keys = list(dict.fromkeys(name.split(".", 1)[0] for name, _ in members))
        assert marker["count"] == marker["successes"] == len(keys) and marker["failed_to_download"] == 0
        meta = _read(s3, f"{out}/shards/{t[:-4]}.parquet")
        assert meta.column("key").to_pylist() == keys and set(meta.column("status").to_pylist()) == {"success"}
        got += members
    assert got == want                                             # same names, bytes and order
    assert shards["unreadable_count"] == 0 and shards["copied"] == len(expected)

    assert again["summary"]["shards"]["finished"] == shards["shards"]     # a rerun finds every shard done
    assert again["summary"]["shards"]["tasks_run"] == 0 and again["summary"]["shards"]["assembled"] == 0
    assert not [p for p in s3.find(BUCKET) if is_temporary(p)]


def test_card_reads_s3_scores_stats_and_filter_and_writes_s3(remote_run):
    import yaml

    _, s3, report = remote_run
    run = report["card"]
    assert run["rc"] == 0, run["stderr"][-3000:]
    kept = report["filter"]["summary"]["kept"]
    out = f"{BUCKET}/card"
    readme = s3.cat_file(f"{out}/README.md").decode()
    assert readme.startswith("---\n") and "wclip-tiny" in yaml.safe_load(readme.split("---\n")[1])["pretty_name"]
    assert f"Kept {kept:,} of {SHARDS * PER_SHARD:,} rows" in readme
    card = json.loads(s3.cat_file(f"{out}/card.json"))
    assert card["rows"] == kept and card["status_counts"] == {"ok": kept}
    assert card["scores"] == f"s3://{BUCKET}/filtered/kept" and card["stats"] == f"s3://{BUCKET}/stats/ref.safetensors"
    assert card["provenance"]["metadata"]["n_reference"] == SHARDS * PER_SHARD
    assert card["filter"]["kept"] == kept and card["filter"]["shards"]["samples_per_shard"] == 10
    assert [r["shard"].startswith(f"s3://{BUCKET}/shards/") for r in card["extremes"]["least_likely"]] == [True] * 3
    assert not [n for n in card["notes"] if "thumbnail" in n or "not found" in n], card["notes"]
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert len(plots) == 6 and sorted(plots) == sorted(card["plots"].values())
    for name in plots:
        assert s3.cat_file(f"{out}/{name}")[:8] == b"\x89PNG\r\n\x1a\n"
    listed = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(out, refresh=True))
    assert listed == sorted(["README.md", "card.json", "kept", *plots])  # kept/: the copied score files
    scored = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{BUCKET}/filtered/kept", refresh=True)
                    if p.endswith(".parquet"))
    copied = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{out}/kept", refresh=True))
    assert copied == scored and scored
    assert [s3.cat_file(f"{out}/kept/{n}") == s3.cat_file(f"{BUCKET}/filtered/kept/{n}") for n in copied] == \
        [True] * len(copied)


# -- the scenario (runs in the subprocess) -------------------------------------------------------------
def _wclip(argv: list) -> dict:
    """Run ``wclip ARGV`` in this process; the summary is the last JSON line it printed, if any."""
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("{")]
    sys.stderr.write(err.getvalue())
    return {"rc": rc, "stderr": err.getvalue(), "summary": json.loads(lines[-1]) if lines else None}


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
        other.rm([f"{bucket}/scores/00001.parquet", marker_path(f"{bucket}/scores", "00001")])
        report["resume"] = _job("score", s3_scores, work, "score-s3-resume")
        report["missing_stats"] = _job("score", {**s3_scores, "stats": f"s3://{bucket}/stats/missing.safetensors",
                                                 "output": str(work / "never")}, work, "score-missing")
        filtered = f"s3://{bucket}/filtered"
        filter_argv = ["filter", "--scores", f"s3://{bucket}/scores", "--output", filtered,
                       "--keep-fraction", "clip_score=0.5", "--input", *shards, "--samples-per-shard", "10",
                       "--samples-per-task", "10", "--no-progress"]
        report["filter"] = _wclip(filter_argv)
        report["filter_again"] = _wclip(filter_argv)
        report["card"] = _wclip(["card", "--scores", f"{filtered}/kept", "--stats", stats, "--filter", filtered,
                                 "--output", f"s3://{bucket}/card", "--extremes", "3"])
        (work / "report.json").write_text(json.dumps(report))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    started = time.time()
    _scenario(json.loads(sys.argv[1]))
    print(f"scenario took {time.time() - started:.1f} s", file=sys.stderr)
