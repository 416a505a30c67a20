"""bench/device_check.sh, the one command for a lent GPU machine, on a machine without CUDA: every GPU step is
skipped with its reason, the report and its JSON are still written, the script exits 0; the CPU smoke steps of
``--quick`` really run the benchmarks' scripts; the deps bundle is unpacked onto PYTHONPATH; a Python that
cannot run stops it with exit 2."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"
GPU_SECTIONS = [  # (step id, section title), in the report's order
    ("gpu_tests", "GPU tests (pytest -m gpu)"),
    ("kernel", "Fused whitening kernel vs unfused torch (bench_kernel.py)"),
    ("encoder", "Image tower images/s, ViT-B-32 and ViT-L-14 (bench_gpu_e2e_model_only.py)"),
    ("arch", "wclip score end to end vs the model alone (bench_arch.py --device cuda)"),
    ("e2e_decode", "wclip score --decode cpu vs gpu (bench_gpu_e2e.py)"),
]
NO_CUDA = "skipped: no CUDA (torch.cuda.is_available() is False)"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(_has_cuda(), reason="checks the CPU path; on a GPU the script measures")


def run_check(tmp_path: Path, *args: str, **env) -> tuple:
    work = tmp_path / "work"
    report = tmp_path / "out" / "device_check.md"
    full_env = dict(os.environ, DEVICE_CHECK_WORK=str(work), TMPDIR=str(tmp_path), PYTHON=sys.executable)
    full_env.pop("OUT", None)
    full_env.update(env)
    proc = subprocess.run(["bash", str(SCRIPT), *args, str(report)], capture_output=True, text=True, env=full_env,
                          cwd=tmp_path, timeout=600)
    return proc, report, report.with_suffix(".json")


def sections(text: str) -> dict:
    """``{title: body}`` of the report's ``## `` sections."""
    out = {}
    for part in text.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        out[title.strip()] = body
    return out


def test_without_cuda_every_gpu_step_is_skipped_with_its_reason(tmp_path):
    proc, report, js = run_check(tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    secs = sections(text)
    titles = list(secs)
    assert titles == ["environment", *[t for _, t in GPU_SECTIONS], "summary"], titles
    assert "- CUDA: no (torch.cuda.is_available() is False)" in secs["environment"]
    for sid, title in GPU_SECTIONS:
        body = secs[title]
        assert NO_CUDA in body, (title, body)
        assert "command: `" in body and "exit " not in body  # named, not run
    kernel = secs[GPU_SECTIONS[1][1]]
    assert ("no CuPy (" in kernel) == (not _has_cupy()), kernel
    assert "no deps bundle" in text
    assert "missing Python packages" not in text  # this checkout's Python has Ray, open_clip, webdataset
    data = json.loads(js.read_text())
    assert data["environment"]["cuda"] is False
    assert [s["id"] for s in data["steps"]] == [sid for sid, _ in GPU_SECTIONS]
    for step in data["steps"]:
        assert step["status"] == "skipped" and step["skipped_because"].startswith("no CUDA"), step
        assert "figures" not in step
    assert "| GPU tests (pytest -m gpu) | skipped: no CUDA" in secs["summary"]


@pytest.mark.slow
def test_quick_mode_runs_the_benchmark_scripts_cpu_smoke(tmp_path):
    proc, report, js = run_check(tmp_path, "--quick")
    assert proc.returncode == 0, report.read_text() if report.exists() else proc.stderr
    secs = sections(report.read_text())
    assert "mode: quick" in report.read_text()
    steps = {s["id"]: s for s in json.loads(js.read_text())["steps"]}
    for sid, _ in GPU_SECTIONS:
        assert steps[sid]["status"] == "skipped"
    kernel = steps["smoke_kernel"]
    assert kernel["status"] == "ok", secs
    assert kernel["figures"]["mode"] == "cpu-smoke"
    assert kernel["figures"]["results"] and all(r["parity_ok"] for r in kernel["figures"]["results"])
    encoder = steps["smoke_encoder"]
    assert encoder["status"] == "ok", secs
    row = encoder["figures"]["results"][0]
    assert row["model"] == "ViT-B-32" and row["images_per_s"] > 0
    body = secs["CPU smoke: bench_kernel.py --cpu-smoke (checks the script; not a GPU figure)"]
    assert body.lstrip().startswith("command: `") and "ok: exit 0" in body and "fastest parity-passing method" in body


def test_the_deps_bundle_goes_ahead_of_site_packages(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in {"site/WCLIP_DEPS_PINS": b"ray==0.0.test\n",
                           "site/braceexpand.py": b"raise ImportError('the bundle came first')\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (work / "deps.tar.xz").write_bytes(buf.getvalue())
    proc, report, js = run_check(tmp_path)
    text = report.read_text()
    assert proc.returncode == 0, proc.stderr
    assert f"deps bundle {work / 'deps.tar.xz'} unpacked to {tmp_path / 'wclip-device-site'}" in text
    assert "(ray==0.0.test)" in text
    # the bundle's braceexpand shadows the installed one: it is reported missing (webdataset, which imports it,
    # too), and the steps that need the packages say so besides no CUDA
    missing = next(line for line in text.splitlines() if line.startswith("- packages missing: "))
    assert "braceexpand" in missing.split(": ", 1)[1].split(", "), missing
    step = {s["id"]: s for s in json.loads(js.read_text())["steps"]}["encoder"]
    assert step["skipped_because"].startswith("no CUDA (torch.cuda.is_available() is False); missing Python "
                                              "packages: ") and "braceexpand" in step["skipped_because"]


def test_a_python_that_cannot_run_stops_it(tmp_path):
    proc, report, js = run_check(tmp_path, PYTHON=str(tmp_path / "no-such-python"))
    assert proc.returncode == 2
    assert "FAILED: " in report.read_text() and "could not run the probe" in report.read_text()
    assert json.loads(js.read_text())["probe"] == "failed"


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path):
    # a Python that fails the kernel benchmark and runs everything else (the probe, the JSON) as it is
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *bench_kernel.py*) echo "kernel broke" >&2; exit 3;; '
                       f'*bench_gpu_e2e_model_only.py*) exit 0;; esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    proc, report, js = run_check(tmp_path, "--quick", PYTHON=str(wrapper))
    assert proc.returncode == 1
    secs = sections(report.read_text())
    body = secs["CPU smoke: bench_kernel.py --cpu-smoke (checks the script; not a GPU figure)"]
    assert "failed: exit 3 after" in body and "kernel broke" in body
    steps = {s["id"]: s for s in json.loads(js.read_text())["steps"]}
    assert steps["smoke_kernel"]["status"] == "failed" and steps["smoke_kernel"]["exit"] == 3
    assert steps["smoke_encoder"]["status"] == "ok"  # ran after the failure
    assert "figures" not in steps["smoke_encoder"]  # it wrote no JSON
    assert "| CPU smoke: bench_kernel.py --cpu-smoke (checks the script; not a GPU figure) | failed |" \
        in secs["summary"]


def test_a_step_without_enough_time_left_is_skipped(tmp_path):
    proc, report, js = run_check(tmp_path, "--quick", DEVICE_CHECK_BUDGET_S="0")
    assert proc.returncode == 0
    steps = {s["id"]: s for s in json.loads(js.read_text())["steps"]}
    for sid in ("smoke_kernel", "smoke_encoder"):
        assert steps[sid]["status"] == "skipped"
        assert steps[sid]["skipped_because"] == "no time left (budget 0 s, DEVICE_CHECK_BUDGET_S)"
    assert steps["kernel"]["skipped_because"].startswith("no CUDA")  # the reason that applies first
