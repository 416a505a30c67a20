"""The ``jobs`` entrypoints (YAML config -> ``wclip`` flags), ``cluster.yaml``, and ``ray job submit``
of ``python -m jobs.fit`` / ``jobs.score`` against a real Ray head started on this machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from jobs._config import JobConfigError, build_argv, load_config, run_job
from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parents[1]

PYTHON_BIN = str(Path(sys.executable).parent)


def _parse(argv):
    return build_parser().parse_args(argv)


# -- config -> flags ----------------------------------------------------------------------------------
def test_config_keys_become_the_commands_flags():
    config = {"input": ["s3://b/{00000..00009}.tar", "extra.tar"], "stats": "s3://b/stats.safetensors",
              "output": "s3://b/scores/", "max_in_flight": 64, "batch-size": 512, "overwrite": True,
              "save_embeddings": False, "model": None, "random_init": True}
    argv = build_argv("score", config)
    assert argv == ["score", "--input", "s3://b/{00000..00009}.tar", "extra.tar",
                    "--stats", "s3://b/stats.safetensors", "--output", "s3://b/scores/",
                    "--max-in-flight", "64", "--batch-size", "512", "--overwrite", "--random-init"]
    args = _parse(argv)
    assert args.input == ["s3://b/{00000..00009}.tar", "extra.tar"] and args.max_in_flight == 64
    assert args.overwrite and not args.save_embeddings and args.random_init and args.model is None


def test_repeatable_flags_take_a_mapping_or_a_list():
    config = {"scores": "s", "output": "o", "min": {"image_loglik": -420, "clip_score": 0.2},
              "keep_fraction": ["clip_score=0.3", "image_loglik:lowest=1%"], "max": "text_sqnorm=900"}
    argv = build_argv("filter", config)
    assert argv == ["filter", "--scores", "s", "--output", "o", "--min", "image_loglik=-420",
                    "--min", "clip_score=0.2", "--keep-fraction", "clip_score=0.3",
                    "--keep-fraction", "image_loglik:lowest=1%", "--max", "text_sqnorm=900"]
    args = _parse(argv)
    assert args.min == ["image_loglik=-420", "clip_score=0.2"] and args.max == ["text_sqnorm=900"]


def test_flags_after_the_config_replace_its_values():
    config = {"input": ["a.tar"], "stats": "st", "output": "out", "retries": 2, "verbose": True}
    argv = build_argv("score", config, ["--input", "b.tar", "c.tar", "--retries=5"])
    assert argv == ["--verbose", "score", "--stats", "st", "--output", "out", "--input", "b.tar", "c.tar",
                    "--retries=5"]
    args = _parse(argv)
    assert args.verbose and args.input == ["b.tar", "c.tar"] and args.retries == 5
    # a repeatable flag given on the command line replaces the config's entries instead of adding to them
    argv = build_argv("filter", {"scores": "s", "output": "o", "min": {"clip_score": 0.2}},
                      ["--min", "image_loglik=-1"])
    assert _parse(argv).min == ["image_loglik=-1"]


@pytest.mark.parametrize("config, message", [
    ({"inptu": ["a.tar"]}, "config key 'inptu' is not a flag of `wclip score`; known keys: .*input"),
    ({"overwrite": "yes"}, "--overwrite is an on/off flag: use true or false, got 'yes'"),
    ({"stats": ["a", "b"]}, r"--stats takes one value, got the list \['a', 'b'\]"),
    ({"retries": True}, "--retries takes a value, got true"),
    ({"input": {"a": 1}}, "--input: expected a single value"),
])
def test_bad_config_values_name_the_key(config, message):
    with pytest.raises(JobConfigError, match=message):
        build_argv("score", config)


def test_bad_config_file_is_refused_before_any_work(tmp_path, capsys):
    path = tmp_path / "score.yaml"
    path.write_text("- input\n- a.tar\n")
    with pytest.raises(JobConfigError, match="must be a mapping of flag: value, got list"):
        load_config(str(path))
    path.write_text("input: [a.tar]\nstats: s.safetensors\noutput: out\ninptu: b.tar\n")
    assert run_job("score", ["--config", str(path)]) == 2
    assert "config key 'inptu' is not a flag of `wclip score`" in capsys.readouterr().err
    assert run_job("score", ["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_remote_stats_are_staged_through_a_local_file(tmp_path, capsys):
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump({"input": ["a.tar"], "output": "s3://bucket/stats/ref.safetensors",
                                    "model": "wclip-tiny", "random_init": True}))
    assert run_job("fit", ["--config", str(path), "--dry-run"], upload=("output",)) == 0
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("jobs.fit: wclip ")][-1]
    argv = line.split("jobs.fit: wclip ", 1)[1].split()
    args = _parse(argv)
    assert argv[argv.index("--output") + 1] == "s3://bucket/stats/ref.safetensors"
    assert args.output.endswith("/ref.safetensors") and "://" not in args.output  # the last --output wins


def test_example_configs_are_valid_command_lines():
    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"fit", "score", "filter", "card"}
    for path in configs:
        args = _parse(build_argv(path.stem, load_config(str(path))))
        assert args.command == path.stem
    # and the module entry point runs from the checkout root, as `ray job submit` runs it
    proc = subprocess.run([sys.executable, "-m", "jobs.score", "--config", "jobs/configs/score.yaml", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wclip score --input 's3://my-bucket/laion/{00000..00999}.tar'" in proc.stderr


# -- cluster.yaml ---------------------------------------------------------------------------------------
def test_cluster_yaml_is_a_valid_launcher_config_with_gpu_workers():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    validate_config(config)  # Ray's own schema, and min/max worker consistency
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert len(gpu_types) >= 2
    instances = {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_types.values()}
    assert instances & {"p4d", "p5"} and "g5" in instances
    for name, t in gpu_types.items():
        assert t["resources"]["CPU"] >= t["resources"]["GPU"], name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in gpu_types.values()) >= 1  # GPUs exist when a job starts
    setup = " ".join(config["setup_commands"])
    assert "wclip[gpu,s3]" in setup and "ray[default]==" in setup


# -- ray job submit against a local head -------------------------------------------------------------
def _free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalHead:
    """``ray start --head --block`` in its own process group, with every port chosen free and a private
    temp dir; stopped by signalling that group (never ``ray stop``, which stops every Ray of this user)."""

    def __init__(self, num_cpus: int = 2):
        self.temp = tempfile.mkdtemp(prefix="wclip-head-", dir="/tmp")  # short: Ray's socket paths
        (self.gcs, self.dashboard, self.client, self.agent_http, self.agent_grpc, self.metrics,
         self.node_manager, self.object_manager, self.runtime_env) = _free_ports(9)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # RAY_AUTH_MODE=token: Ray's token authentication, which a local head turns on by default; the
        # head and `ray job submit` then both use the token in ~/.ray/auth_token.
        self.env.update(PATH=f"{PYTHON_BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                        RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
        cmd = [f"{PYTHON_BIN}/ray", "start", "--head", "--block", f"--port={self.gcs}", f"--num-cpus={num_cpus}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
               f"--ray-client-server-port={self.client}", f"--dashboard-agent-listen-port={self.agent_http}",
               f"--dashboard-agent-grpc-port={self.agent_grpc}", f"--metrics-export-port={self.metrics}",
               f"--node-manager-port={self.node_manager}", f"--object-manager-port={self.object_manager}",
               f"--runtime-env-agent-port={self.runtime_env}", f"--temp-dir={self.temp}",
               "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        self.log = open(os.path.join(self.temp, "ray-start.log"), "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dashboard}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:  # it answers (401: Ray's token authentication is on)
                return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the Ray dashboard did not come up in {timeout} s: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def submit(self, *entrypoint: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """``ray job submit`` (waits for the job and prints its logs)."""
        cmd = [f"{PYTHON_BIN}/ray", "job", "submit", "--address", self.address, "--working-dir", str(REPO),
               "--", *entrypoint]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def jobs(self) -> dict:
        """{module: {status, logs}} of the submitted jobs, from the Job SDK (in a process with this env)."""
        code = ("import json, sys; from ray.job_submission import JobSubmissionClient as C; "
                "c = C(sys.argv[1]); print(json.dumps({j.entrypoint.split()[2]: {'status': str(j.status.value), "
                "'logs': c.get_job_logs(j.submission_id)} for j in c.list_jobs()}))")
        proc = subprocess.run([sys.executable, "-c", code, self.address], env=self.env, capture_output=True,
                              text=True, timeout=60, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            pgid = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGKILL)  # anything of ours still alive in the group
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def local_head():
    head = LocalHead(num_cpus=2)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


def test_ray_job_submit_runs_fit_then_score(local_head, tmp_path):
    from shardkit import clean_shards, marker

    shards = tmp_path / "shards"
    shards.mkdir()
    clean_shards(shards, shards=2, per_shard=24)
    stats, scores = tmp_path / "stats.safetensors", tmp_path / "scores"
    common = {"model": "wclip-tiny", "random_init": True, "chunk_size": 8}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(
        {"input": [str(shards / "{00000..00001}.tar")], "output": str(stats), "components": 8, **common}))
    (tmp_path / "score.yaml").write_text(yaml.safe_dump(
        {"input": [str(shards)], "stats": str(stats), "output": str(scores)}))

    fit = local_head.submit("python", "-m", "jobs.fit", "--config", str(tmp_path / "fit.yaml"))
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    score = local_head.submit("python", "-m", "jobs.score", "--config", str(tmp_path / "score.yaml"),
                              "--retries", "1")
    assert score.returncode == 0, score.stdout[-3000:] + score.stderr[-3000:]

    jobs = local_head.jobs()
    assert {name: j["status"] for name, j in jobs.items()} == {"jobs.fit": "SUCCEEDED", "jobs.score": "SUCCEEDED"}
    logs = jobs["jobs.score"]["logs"]
    command = next(line for line in logs.splitlines() if line.startswith("jobs.score: wclip score "))
    args = _parse(command.split("jobs.score: wclip ", 1)[1].split())
    assert (args.input, args.stats, args.output, args.retries) == ([str(shards)], str(stats), str(scores), 1)
    assert f"score -> {scores}: 48 rows from 2 shards" in logs
    for name in ("00000", "00001"):
        table = pq.read_table(scores / f"{name}.parquet")
        assert table.num_rows == 24
        assert table.column("status").to_pylist() == ["ok"] * 24
        assert np.isfinite(table.column("image_loglik").to_numpy()).all()
        record = marker(scores, name)
        assert record["rows"] == 24
