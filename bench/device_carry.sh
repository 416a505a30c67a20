#!/usr/bin/env bash
# Build .bench/device/deps.tar.xz: the Python packages wclip needs that the lent GPU machine's image lacks
# (its python3 3.12 has torch, CuPy, pyarrow, pillow, ... but not Ray, open_clip or webdataset), as PyPI
# wheels for CPython 3.12 on x86-64 Linux, at the versions installed in this checkout's .venv, unpacked and
# trimmed to fit the device tool's 64 MiB carry limit. bench/device_check.sh unpacks it there and puts it on
# PYTHONPATH. Run it here (it needs PyPI), once per set of versions:
#
#     bench/device_carry.sh            # -> .bench/device/deps.tar.xz (reused while the versions are the same)
#
# Ray's wheel alone is over the limit: its Java jars, the dashboard's web client build and RLlib are dropped
# (wclip starts Ray without a dashboard page and uses neither Java nor RLlib).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.bench/device"
VENV_PY="${VENV_PY:-$ROOT/.venv/bin/python}"
# wclip's own needs missing from the image, and theirs (Ray: jsonschema -> referencing, rpds-py,
# jsonschema-specifications; open_clip: ftfy -> wcwidth; webdataset: braceexpand); zstandard: .tar.zst input
PACKAGES=(ray open_clip_torch webdataset braceexpand ftfy wcwidth jsonschema jsonschema-specifications referencing
          rpds-py zstandard)
LIMIT_MB=48  # leaves room for the working tree under the 64 MiB a call carries

pins=$("$VENV_PY" - "${PACKAGES[@]}" <<'EOF'
import importlib.metadata as md, sys
print(" ".join(f"{name}=={md.version(name)}" for name in sys.argv[1:]))
EOF
)
mkdir -p "$DEST"
if [[ -f "$DEST/deps.tar.xz" && "$(cat "$DEST/deps.pins" 2>/dev/null)" == "$pins" ]]; then
    echo "$DEST/deps.tar.xz is up to date ($pins)"
    exit 0
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
target=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" --only-binary=:all:)
rm -rf "$DEST/wheels" "$DEST/site" "$DEST/deps.tar.xz.tmp"
echo "downloading: $pins"
# shellcheck disable=SC2086
"$VENV_PY" -m pip download -q --no-deps "${target[@]}" -d "$DEST/wheels" $pins
# pip installs into the folder (executable bits of Ray's binaries, .data/ folders) without running anything
"$VENV_PY" -m pip install -q --no-deps --no-compile --no-index --target "$DEST/site" "${target[@]}" "$DEST"/wheels/*.whl
rm -rf "$DEST/site/ray/jars" "$DEST/site/ray/dashboard/client/build" "$DEST/site/ray/rllib" "$DEST/site/bin"
find "$DEST/site" -name __pycache__ -prune -exec rm -rf {} +
echo "$pins" > "$DEST/site/WCLIP_DEPS_PINS"  # device_check.sh names the versions in its report
echo "compressing $(du -sm "$DEST/site" | cut -f1) MB ..."
tar -C "$DEST" -cf - site | xz -6 -T0 > "$DEST/deps.tar.xz.tmp"
size_mb=$(( $(stat -c %s "$DEST/deps.tar.xz.tmp") / 1048576 ))
if (( size_mb > LIMIT_MB )); then
    echo "deps.tar.xz is $size_mb MB, over $LIMIT_MB MB: trim more before carrying it" >&2
    exit 1
fi
mv "$DEST/deps.tar.xz.tmp" "$DEST/deps.tar.xz"
echo "$pins" > "$DEST/deps.pins"
rm -rf "$DEST/wheels" "$DEST/site"
echo "wrote $DEST/deps.tar.xz ($size_mb MB); carry it: run(..., carry=[\".bench/device/deps.tar.xz\"])"
