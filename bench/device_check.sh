#!/usr/bin/env bash
# Every GPU check of wclip in one command, for a lent GPU machine: the GPU tests (pytest -m gpu), the fused
# whitening kernel vs unfused torch (bench_kernel.py), the image tower's images/s for ViT-B-32 and ViT-L-14
# (bench_gpu_e2e_model_only.py), `wclip score` end to end vs the model alone (bench_arch.py --device cuda) and
# --decode cpu vs gpu (bench_gpu_e2e.py). Each step has a time limit and the whole stays within a budget
# (default 450 s). Their figures go to one Markdown file, with a JSON file beside it holding every step's
# status and the benchmarks' own JSON reports.
#
#     bench/device_check.sh [--quick] [REPORT.md]
#
# REPORT.md defaults to $OUT/device_check.md where $OUT is set (the device tool's folder), else
# .bench/device/device_check.md. --quick: small sizes (a first try; not timed on a GPU yet); on a machine
# without CUDA it also runs the benchmarks' CPU smoke modes, which check the scripts and measure nothing.
#
# On a machine without CUDA (or CuPy, or the packages of the deps bundle) each step that needs it is skipped
# with a line saying why; the report is still written. Exit status: 0 when every step passed or was skipped,
# 1 when one failed or ran out of time, 2 when the checks could not start (no usable Python).
#
# The GPU machine's image has torch, CuPy and pyarrow but not Ray, open_clip or webdataset: build them here
# with bench/device_carry.sh and carry .bench/device/deps.tar.xz (docs/gpu.md); this script unpacks it and
# puts it on PYTHONPATH.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

QUICK=0
REPORT=""
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "device_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) REPORT="$arg" ;;
    esac
done
if [[ -z "$REPORT" ]]; then
    if [[ -n "${OUT:-}" ]]; then REPORT="$OUT/device_check.md"; else REPORT="$ROOT/.bench/device/device_check.md"; fi
fi
mkdir -p "$(dirname "$REPORT")"
REPORT="$(cd "$(dirname "$REPORT")" && pwd)/$(basename "$REPORT")"
JSON="${REPORT%.md}.json"
WORK="${DEVICE_CHECK_WORK:-$ROOT/.bench/device}"  # logs, the deps bundle, the benchmarks' data
LOGS="$WORK/logs"
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.json "$LOGS"/*.status
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-450}"
DEADLINE=$((SECONDS + BUDGET_S))

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY="python3"; fi

# -- the deps bundle (bench/device_carry.sh) ------------------------------------------------------------
BUNDLE="$WORK/deps.tar.xz"
DEPS_NOTE="no deps bundle ($BUNDLE absent): the packages below are whatever this Python has"
if [[ -f "$BUNDLE" ]]; then
    SITE="${TMPDIR:-/tmp}/wclip-device-site"
    if [[ ! -f "$SITE/.unpacked" || "$BUNDLE" -nt "$SITE/.unpacked" ]]; then
        rm -rf "$SITE" && mkdir -p "$SITE" && tar -C "$SITE" --strip-components=1 -xJf "$BUNDLE" && touch "$SITE/.unpacked" \
            || { echo "device_check: could not unpack $BUNDLE" >&2; exit 2; }
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    DEPS_NOTE="deps bundle $BUNDLE unpacked to $SITE, on PYTHONPATH ahead of site-packages ($(cat "$SITE/WCLIP_DEPS_PINS" 2>/dev/null || echo 'pins unknown'))"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # `python -m pipeline` from any folder
export PYTHONUNBUFFERED=1

# -- what this machine has --------------------------------------------------------------------------------
PROBE="$LOGS/probe.json"
"$PY" - "$PROBE" > "$LOGS/probe.log" 2>&1 <<'EOF'
import importlib, json, platform, subprocess, sys
env = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=bool(torch.cuda.is_available()))
    if env["cuda"]:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
except Exception as exc:
    env.update(torch=None, cuda=False, torch_error=f"{type(exc).__name__}: {exc}")
try:
    import cupy
    env["cupy"] = cupy.__version__
except Exception as exc:
    env["cupy"] = None
    env["cupy_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
missing = []
for mod in ("ray", "open_clip", "webdataset", "braceexpand", "pyarrow", "safetensors", "fsspec", "PIL", "pytest"):
    try:
        importlib.import_module(mod)
    except Exception:
        missing.append(mod)
env["missing_packages"] = missing
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    env["nvidia_smi"] = out.stdout.strip() if out.returncode == 0 else None
except Exception:
    env["nvidia_smi"] = None
json.dump(env, open(sys.argv[1], "w"))
EOF
probe_rc=$?

probe() {  # probe KEY -> the value of KEY in the probe's JSON
    "$PY" -c 'import json, sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v in (None, False) else (", ".join(v) if isinstance(v, list) else v))' "$PROBE" "$1" 2>/dev/null
}

{
    echo "# wclip device check"
    echo
    echo "- started: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), $(nproc) CPUs; mode: $([[ $QUICK == 1 ]] && echo quick || echo full); budget ${BUDGET_S} s"
    if head=$(git rev-parse --short HEAD 2>/dev/null); then
        echo "- git: $head ($(git status --short 2>/dev/null | wc -l) changed files)"
    else
        echo "- git: not a git checkout (a copy of the working tree)"
    fi
    echo "- $DEPS_NOTE"
} > "$REPORT"

if [[ $probe_rc -ne 0 ]]; then
    { echo; echo "## environment"; echo; echo "FAILED: $PY could not run the probe (exit $probe_rc):"; echo
      echo '```'; tail -n 20 "$LOGS/probe.log"; echo '```'; } >> "$REPORT"
    printf '{"report": "%s", "probe": "failed", "steps": []}\n' "$REPORT" > "$JSON"
    echo "device_check: $PY could not run the probe; see $REPORT" >&2
    exit 2
fi
CUDA="$(probe cuda)"
CUPY="$(probe cupy)"
MISSING="$(probe missing_packages)"
{
    echo
    echo "## environment"
    echo
    echo "- python $(probe python) ($(probe executable)); torch $(probe torch), built for CUDA $(probe torch_cuda)"
    echo "- CUDA: $([[ -n $CUDA ]] && echo "yes: $(probe gpu), capability $(probe capability), $(probe memory_gib) GiB" || echo "no (torch.cuda.is_available() is False)")"
    echo "- nvidia-smi: $(probe nvidia_smi)"
    echo "- CuPy: $([[ -n $CUPY ]] && echo "$CUPY" || echo "none ($(probe cupy_error))")"
    echo "- packages missing: ${MISSING:-none}"
} >> "$REPORT"

why_not() {  # why_not NEEDS (comma-separated: cuda, cupy, deps) -> empty when all are met
    local reasons=()
    [[ ",$1," == *",cuda,"* && -z $CUDA ]] && reasons+=("no CUDA (torch.cuda.is_available() is False)")
    [[ ",$1," == *",cupy,"* && -z $CUPY ]] && reasons+=("no CuPy ($(probe cupy_error))")
    [[ ",$1," == *",deps,"* && -n $MISSING ]] && reasons+=("missing Python packages: $MISSING (build .bench/device/deps.tar.xz with bench/device_carry.sh and carry it)")
    local IFS=";"
    echo "${reasons[*]}" | sed 's/;/; /g'
}

FAILED=0
step() {  # step ID TITLE NEEDS LIMIT_S COMMAND...: run COMMAND (its own JSON report at $LOGS/ID.json, if any)
    local id="$1" title="$2" needs="$3" limit="$4"
    shift 4
    local reason status rc=0 started elapsed left
    reason="$(why_not "$needs")"
    left=$((DEADLINE - SECONDS))
    { echo; echo "## $title"; echo; echo "command: \`$*\`"; echo; } >> "$REPORT"
    if [[ -n "$reason" ]]; then
        status="skipped"
        echo "skipped: $reason" >> "$REPORT"
    elif (( left < 20 )); then
        status="skipped"
        reason="no time left (budget ${BUDGET_S} s, DEVICE_CHECK_BUDGET_S)"
        echo "skipped: $reason" >> "$REPORT"
    else
        (( limit > left )) && limit=$left
        echo "device_check: $title (limit ${limit} s) ..." >&2
        started=$SECONDS
        timeout --kill-after=10 "$limit" "$@" > "$LOGS/$id.log" 2>&1
        rc=$?
        elapsed=$((SECONDS - started))
        if [[ $rc -eq 0 ]]; then status="ok"
        elif [[ $rc -eq 124 || $rc -eq 137 ]]; then status="timed out"; FAILED=1
        else status="failed"; FAILED=1; fi
        { echo "$status: exit $rc after ${elapsed} s (limit ${limit} s); last lines of its output:"; echo
          echo '```'; tail -n 45 "$LOGS/$id.log"; echo '```'; } >> "$REPORT"
    fi
    echo "$id	$status	${rc}	${reason}	$title	$*" >> "$LOGS/steps.tsv"
}

: > "$LOGS/steps.tsv"
GPU_TESTS=$(grep -rlE "pytest\.mark\.gpu|marks=pytest\.mark\.gpu" tests --include='*.py' | sort | tr '\n' ' ')
if [[ $QUICK == 1 ]]; then
    KERNEL_ARGS=(--batch 1024 8192 --dims 768 --repeats 10)
    ENCODER_ARGS=(--models ViT-B-32 ViT-L-14 --batch 256 --repeats 5)
    ARCH_ARGS=(--images ViT-B-32=2048 ViT-L-14=1024 --distinct 8)
    E2E_ARGS=(--shards 4 --per-shard 256)
else
    KERNEL_ARGS=()
    ENCODER_ARGS=(--models ViT-B-32 ViT-L-14)
    ARCH_ARGS=()
    E2E_ARGS=(--shards 16 --per-shard 256)
fi

# shellcheck disable=SC2086
step gpu_tests "GPU tests (pytest -m gpu)" cuda,deps 150 \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS
step kernel "Fused whitening kernel vs unfused torch (bench_kernel.py)" cuda,cupy 90 \
    "$PY" bench/bench_kernel.py "${KERNEL_ARGS[@]}" --json "$LOGS/kernel.json"
step encoder "Image tower images/s, ViT-B-32 and ViT-L-14 (bench_gpu_e2e_model_only.py)" cuda,deps 90 \
    "$PY" bench/bench_gpu_e2e_model_only.py "${ENCODER_ARGS[@]}" --json "$LOGS/encoder.json"
step arch "wclip score end to end vs the model alone (bench_arch.py --device cuda)" cuda,deps 180 \
    "$PY" bench/bench_arch.py --device cuda --rounds 1 "${ARCH_ARGS[@]}" --json "$LOGS/arch.json"
step e2e_decode "wclip score --decode cpu vs gpu (bench_gpu_e2e.py)" cuda,deps 150 \
    "$PY" bench/bench_gpu_e2e.py --models ViT-B-32 ViT-L-14 --decode cpu,gpu "${E2E_ARGS[@]}" \
    --workdir "$WORK/e2e" --json "$LOGS/e2e_decode.json"
if [[ $QUICK == 1 && -z $CUDA ]]; then  # the scripts' CPU smoke modes: their logic, no figure
    step smoke_kernel "CPU smoke: bench_kernel.py --cpu-smoke (checks the script; not a GPU figure)" "" 60 \
        "$PY" bench/bench_kernel.py --cpu-smoke --batch 64 --dims 32 --dtypes fp32 --warmup 1 --repeats 2 \
        --json "$LOGS/smoke_kernel.json"
    step smoke_encoder "CPU smoke: bench_gpu_e2e_model_only.py --cpu-smoke (checks the script; not a GPU figure)" "" 90 \
        "$PY" bench/bench_gpu_e2e_model_only.py --cpu-smoke --models ViT-B-32 --batch 2 --warmup 1 --repeats 1 \
        --precision fp32 --json "$LOGS/smoke_encoder.json"
fi

# -- the JSON beside the report: each step's status and its benchmark's own JSON ----------------------------
"$PY" - "$LOGS" "$JSON" "$REPORT" <<'EOF'
import json, sys
from pathlib import Path
logs, out, report = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
steps = []
for line in (logs / "steps.tsv").read_text().splitlines():
    sid, status, rc, reason, title, command = line.split("\t", 5)
    entry = {"id": sid, "title": title, "status": status, "exit": int(rc), "command": command}
    if reason:
        entry["skipped_because"] = reason
    figures = logs / f"{sid}.json"
    if status != "skipped" and figures.exists():
        try:
            entry["figures"] = json.loads(figures.read_text())
        except ValueError as exc:
            entry["figures_error"] = f"unreadable JSON: {exc}"
    steps.append(entry)
out.write_text(json.dumps({"report": report, "environment": json.loads((logs / "probe.json").read_text()),
                           "steps": steps}, indent=1))
with open(report, "a") as fh:
    fh.write("\n## summary\n\n| step | status |\n|---|---|\n")
    for s in steps:
        reason = f": {s['skipped_because']}" if "skipped_because" in s else ""
        fh.write(f"| {s['title']} | {s['status']}{reason} |\n")
EOF

{
    echo
    echo "finished $(date -u '+%Y-%m-%d %H:%M:%S UTC') after ${SECONDS} s; figures as JSON: $JSON"
} >> "$REPORT"
sed -n '/^## summary/,$p' "$REPORT"  # the device tool shows the end of the output even if no file comes back
echo "device_check: wrote $REPORT and $JSON" >&2
exit "$FAILED"
