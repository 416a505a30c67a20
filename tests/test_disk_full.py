"""A full disk: one line naming the path, the failures still reported, and no temporary file left behind by
any command (a real 256 KiB tmpfs; needs root to mount, skipped otherwise)."""

import json
import os
import subprocess
import sys
import uuid

import pytest
from shardkit import clean_shards

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _wclip(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _debris(folder):
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_score_and_fit_on_a_full_disk(tmp_path, tiny_disk):
    inputs = tmp_path / "in"
    inputs.mkdir()
    urls = clean_shards(inputs, shards=4, per_shard=300)
    stats = tmp_path / "stats.safetensors"
    common = ["--model", "wclip-tiny", "--random-init", "--num-cpus", "2", "--no-progress", "--retries", "0"]
    fitted = _wclip("fit", "--input", urls[0], "--output", str(stats), "--components", "4", *common)
    assert fitted.returncode == 0, fitted.stderr
    # fill the disk so that the score files do not fit, but small records still do
    (tiny_disk / "filler").write_bytes(b"\0" * (200 << 10))
    out = tiny_disk / "scores"
    result = _wclip("score", "--input", *urls, "--stats", str(stats), "--output", str(out), *common)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if "No space left on device" in line]
    assert failed and all(str(out) in line for line in failed), result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failed"] and all("No space left on device" in f["error"] for f in summary["failed"])
    assert _debris(tiny_disk) == []
    # fit writing its stats file onto the full disk: one line, exit 2 or 1, no debris
    (tiny_disk / "filler2").write_bytes(b"\0" * max(0, os.statvfs(tiny_disk).f_bavail * 4096 - 4096))
    result = _wclip("fit", "--input", urls[0], "--output", str(tiny_disk / "s.safetensors"), "--components",
                    "4", *common)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "No space left on device" in result.stderr and str(tiny_disk / "s.safetensors") in result.stderr
    assert _debris(tiny_disk) == [] and not (tiny_disk / "s.safetensors").exists()


def test_filter_on_a_full_disk_blames_the_output_not_the_scores(tmp_path, tiny_disk, capsys):
    """Issue #26 (7): ENOSPC while writing kept/ said "cannot read .../scores/00000.parquet ... move it out of the
    scores folder" (exit 2). Now: one line naming the kept file it could not write, exit 1, no debris."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "curate"))
    from test_filter import make_corpus

    from pipeline.cli import main

    _, score_dir, _ = make_corpus(tmp_path)
    before = {p.name: p.read_bytes() for p in score_dir.iterdir()}
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 4096))
    out = tiny_disk / "out"
    capsys.readouterr()
    assert main(["filter", "--scores", str(score_dir), "--output", str(out), "--min", "clip_score=0",
                 "--no-progress"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"wclip filter: error: cannot write {out / 'kept' / '00000.parquet'}: No space left on device; "
                    "free space there (or fix its permissions) or pass another --output, then rerun")
    assert _debris(tiny_disk) == [] and list((out / "kept").iterdir()) == []
    assert {p.name: p.read_bytes() for p in score_dir.iterdir()} == before   # the input untouched
