"""The peer tools (clip-retrieval, img2dataset) in virtualenvs of their own under ``.bench/``, installed from
PyPI on first use, for the benchmarks and for the tests that run them. One environment per tool: their
pins (webdataset < 0.3, pandas < 3, ...) never touch the project's ``.venv``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".bench"
CONSTRAINTS = ROOT / "constraints" / "local.txt"


class PeerSetupError(RuntimeError):
    """A peer tool could not be installed (no PyPI, a failed build); the message names the log."""


def peer_python(name: str, requirements: tuple, check: str, torch: bool = False) -> Path:
    """The Python of ``.bench/<name>``, a virtualenv with ``requirements`` installed (idempotent: a stamp
    of what was installed); ``check`` is Python code that must run there afterwards. ``torch``: install
    the project's torch pins first (the local CPU-capable build, not a CUDA download)."""
    venv = PEERS / name
    py = venv / "bin" / "python"
    stamp = venv / ".peer-installed"
    want = hashlib.sha256(CONSTRAINTS.read_bytes() + repr((requirements, torch)).encode()).hexdigest()
    if py.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return py
    log = PEERS / f"{name}-install.log"
    PEERS.mkdir(parents=True, exist_ok=True)
    print(f"setting up {name} in {venv} (first use; a few minutes; log: {log}) ...", flush=True)
    steps = [[os.environ.get("PYTHON", "python3"), "-m", "venv", str(venv)]] if not py.exists() else []
    steps.append([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    if torch:
        steps.append([str(py), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), "torch", "torchvision"])
    steps += [[str(py), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), *requirements],
              [str(py), "-c", check]]
    with open(log, "a") as fh:
        for cmd in steps:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                raise PeerSetupError(f"{name} set-up failed at `{shlex.join(cmd)}`; see {log}")
    stamp.write_text(want + "\n")
    return py
