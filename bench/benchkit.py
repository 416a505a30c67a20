"""What the benchmark scripts share, written once: the process tree of a command and its sampled memory and CPU
time (PSS from /proc/<pid>/smaps_rollup), running a command to its end while sampling it, the environment a
measured command runs in, and the library snapshot (a copy of ``pipeline/`` that every measured command
imports, for a checkout that others edit while a benchmark runs).

The scripts import it as ``import benchkit``: ``python bench/bench_x.py`` puts bench/ first on sys.path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SNAPSHOTS = ROOT / ".bench" / "peers" / "snapshot"  # working-tree copies (--snapshot), shared by the scripts
WCLIP = [sys.executable, "-m", "pipeline"]  # `wclip`, also where no console script is installed (a GPU machine)


# -- the process tree --------------------------------------------------------------------------------------
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def scan() -> dict:
    """{pid: (parent pid, CPU seconds so far)} of every process, from /proc/<pid>/stat."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
                procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
            except (OSError, IndexError, ValueError):
                continue
    return procs


def tree(root: int, procs: dict | None = None) -> list:
    """``root`` and all its descendants (``root`` first)."""
    procs = scan() if procs is None else procs
    kids: dict = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def pss_uss_kb(pid: int) -> tuple:
    """(PSS, USS) of ``pid`` in kB from /proc/<pid>/smaps_rollup (USS: the Private_* lines, as psutil counts
    it); (0, 0) for a process that is gone."""
    pss = uss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith(b"Private_"):
                    uss += int(line.split()[1])
    except (OSError, IndexError, ValueError):
        return 0, 0
    return pss, uss


def pss_kb(pid: int) -> int:
    return pss_uss_kb(pid)[0]


class TreeSampler(threading.Thread):
    """Samples the process tree under ``pid`` every ``interval`` seconds until ``stop()``: the peak summed RSS,
    the peak summed PSS (every ``pss_every``-th sample: smaps_rollup costs more), the peak PSS of ``pid`` itself
    (the driver), the most processes, the CPU seconds of every process seen (its last sample: Ray's workers
    too, which the command does not wait for; one that lives less than ``interval`` is missed), the summed
    PSS over time, and per process its (PSS, USS) at its peak PSS."""

    def __init__(self, pid: int, interval: float = 0.25, pss_every: int = 1):
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.peak_rss_kb = self.peak_pss_kb = self.driver_pss_kb = self.max_procs = 0
        self.cpu: dict = {}
        self.per_process: dict = {}
        self.timeline: list = []  # (seconds since start, summed PSS in MB)
        self._done = threading.Event()
        self._start = time.perf_counter()

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())

    def sample(self, i: int) -> None:
        procs = scan()
        pids = tree(self.pid, procs)
        self.cpu.update((p, max(self.cpu.get(p, 0.0), procs[p][1])) for p in pids if p in procs)
        self.max_procs = max(self.max_procs, len(pids))
        self.peak_rss_kb = max(self.peak_rss_kb, sum(rss_kb(p) for p in pids))
        if i % self.pss_every:
            return
        sizes = [pss_uss_kb(p) for p in pids]
        total = sum(pss for pss, _ in sizes)
        self.peak_pss_kb, self.driver_pss_kb = max(self.peak_pss_kb, total), max(self.driver_pss_kb, sizes[0][0])
        for p, size in zip(pids, sizes):
            if size != (0, 0):
                self.per_process[p] = max(self.per_process.get(p, (0, 0)), size)
        self.timeline.append((round(time.perf_counter() - self._start, 2), total >> 10))

    def run(self):
        i = 0
        while not self._done.is_set():
            self.sample(i)
            i += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


# -- running a command -------------------------------------------------------------------------------------
SNAPSHOT: dict = {}  # {"path": the library copy put first on PYTHONPATH, "digest": ...} once use_snapshot took one


def command_env(library: Path | str | None = None, **extra) -> dict:
    """This process's environment for a measured command: ``extra`` set, no RAY_ADDRESS (a private local Ray,
    as on a user's machine), and ``library`` (default: the snapshot in use, if any) first on PYTHONPATH."""
    env = dict(os.environ, **extra)
    env.pop("RAY_ADDRESS", None)
    library = library or SNAPSHOT.get("path")
    if library:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(library), env.get("PYTHONPATH")]))
    return env


@dataclass
class Ran:
    """A command run to its end: exit status, wall and CPU seconds, the 1-minute load average before it,
    its output, and the sampler that watched its process tree."""

    returncode: int
    wall_s: float
    cpu_s: float  # the larger of the sampled tree's CPU seconds and getrusage's (waited-for processes)
    load_before: tuple
    stdout: str
    stderr: str
    memory: TreeSampler


def run(cmd: list, *, env: dict | None = None, cwd: Path | str | None = None, log_stem: Path | None = None,
        interval: float = 0.25, pss_every: int = 1, quiet: bool = False) -> Ran:
    """Run ``cmd`` to its end while a TreeSampler watches its process tree. Its stdout and stderr go to
    ``log_stem``.out / .err (kept), else to temporary files; ``quiet``: to /dev/null."""
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        stem = Path(tmp) / "command" if log_stem is None else log_stem
        stem.parent.mkdir(parents=True, exist_ok=True)
        out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(os.devnull if quiet else out_path, "w") as out, open(os.devnull if quiet else err_path, "w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
            memory = TreeSampler(proc.pid, interval, pss_every)
            memory.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            memory.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        read = (lambda p: "") if quiet else (lambda p: p.read_text())
        return Ran(proc.returncode, wall, max(memory.cpu_s, usage.ru_utime + usage.ru_stime), load,
                   read(out_path), read(err_path), memory)


def last_json(text: str):
    """The last line of a command's output, parsed as JSON (wclip's summary line)."""
    return json.loads(text.strip().splitlines()[-1])


def run_summary(cmd: list, what: str, **kw) -> dict:
    """``run(cmd, **kw)``, exiting with ``what`` failed and the end of its stderr unless it succeeded: its last
    stdout line (JSON), with ``wall_s`` and the tree's ``peak_pss_mb``."""
    ran = run(cmd, **kw)
    if ran.returncode != 0:
        raise SystemExit(f"{what} failed:\n{ran.stderr[-3000:]}")
    return dict(last_json(ran.stdout), wall_s=ran.wall_s, peak_pss_mb=ran.memory.peak_pss_kb / 1024)


def run_command(cmd: list, log_stem: Path, cwd: Path) -> dict:
    """Run ``cmd`` (the snapshot in use on its path, logs at ``log_stem``.out/.err) and exit if it fails; wall
    time, CPU time of the tree, peak memory (RSS summed every 0.25 s, PSS every 1 s)."""
    ran = run(cmd, env=command_env(), cwd=cwd, log_stem=log_stem, interval=0.25, pss_every=4)
    if ran.returncode != 0:
        raise SystemExit(f"command failed (exit {ran.returncode}): {shlex.join(cmd)}\n{ran.stderr[-3000:]}")
    mem = ran.memory
    return {"wall_s": ran.wall_s, "cpu_s": ran.cpu_s, "load_before": list(ran.load_before),
            "peak_rss_mb": mem.peak_rss_kb / 1024, "peak_pss_mb": mem.peak_pss_kb / 1024,
            "max_processes": mem.max_procs, "stdout": ran.stdout, "log": str(log_stem.with_suffix(".err"))}


def pattern(urls: list) -> str:
    """A brace pattern for consecutive shards NNNNN.tar in one folder."""
    first, last = Path(urls[0]), Path(urls[-1])
    return str(first) if len(urls) == 1 else str(first.parent / f"{{{first.stem}..{last.stem}}}.tar")


def stats_match(path: Path, identity) -> bool:
    """Whether the stats file ``path`` exists and was fitted with the model ``identity``."""
    from safetensors import safe_open

    if not path.exists():
        return False
    with safe_open(str(path), "numpy") as f:
        return json.loads(f.metadata()["wclip"]).get("model_identity") == identity


# -- the library snapshot ----------------------------------------------------------------------------------
class Library:
    """One copy of the library (``pipeline/``) in ``path`` (complete once ``path``/.complete exists), that
    measured commands import (``env``: first on PYTHONPATH; run them with a working directory outside the
    checkout, since ``python -m`` and Ray put the working directory on the path) and this process too
    (``import_here``)."""

    def __init__(self, path: Path, info: dict):
        self.path, self.info = path, info

    @classmethod
    def at_commit(cls, commit: str, under: Path) -> Library:
        """The library at ``commit`` (``git archive``), in ``under``/<short commit>."""
        short = _git("rev-parse", "--short", commit, check=True).strip()
        path = under / short
        if not (path / ".complete").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            archive = subprocess.run(["git", "archive", short, "pipeline"], capture_output=True, cwd=ROOT,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
            (path / ".complete").write_text(short + "\n")
        return cls(path, {"path": str(path), "commit": short})

    @classmethod
    def working_tree(cls, under: Path = SNAPSHOTS) -> Library:
        """The working tree's ``pipeline`` (sources and assets, uncommitted edits included), compiled, in
        ``under``/<digest of its files>."""
        import compileall

        src = ROOT / "pipeline"
        files = sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes() + b"\0")
        digest = digest.hexdigest()
        dest = under / digest[:16]
        if not (dest / ".complete").exists():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            for p in files:
                target = tmp / "pipeline" / p.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, target)
            if not compileall.compile_dir(str(tmp / "pipeline"), quiet=1):
                raise SystemExit(f"the working tree's pipeline/ does not compile right now (someone is mid-edit?); "
                                 f"retry in a moment (copy left in {tmp})")
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
            (dest / ".complete").write_text(digest + "\n")
        dirty = _git("status", "--short", "--", "pipeline").splitlines()
        return cls(dest, {"path": str(dest), "digest": digest, "git_head": _git("rev-parse", "HEAD").strip(),
                          "uncommitted_files_in_pipeline": len(dirty)})

    @classmethod
    def made_earlier(cls, path) -> Library:
        path = Path(path).resolve()
        if not (path / ".complete").exists():
            raise SystemExit(f"--use-snapshot {path}: not a complete snapshot")
        return cls(path, {"path": str(path), "digest": (path / ".complete").read_text().strip()})

    def env(self, **extra) -> dict:
        return command_env(self.path, **extra)

    def import_here(self) -> None:
        """This process imports ``pipeline`` from the copy from now on."""
        if str(self.path) not in sys.path:
            sys.path.insert(0, str(self.path))


def _git(*args, check: bool = False) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=check).stdout


def use_snapshot(args) -> None:
    """--snapshot / --use-snapshot: this process and every command run from then on (``command_env``) import
    that copy; SNAPSHOT says which."""
    if not (args.snapshot or args.use_snapshot):
        return
    assert "pipeline" not in sys.modules
    lib = Library.made_earlier(args.use_snapshot) if args.use_snapshot else Library.working_tree()
    SNAPSHOT.update(lib.info)
    lib.import_here()
    print(f"library snapshot: {SNAPSHOT}", flush=True)


def shardkit():
    """tests/shardkit.py, the tests' writer of real tar shards (reused, not copied), loaded from its file: the
    tests folder is not a package and is not on a script's path."""
    import importlib.util

    if "shardkit" not in sys.modules:
        spec = importlib.util.spec_from_file_location("shardkit", ROOT / "tests" / "shardkit.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["shardkit"] = module
        spec.loader.exec_module(module)
    return sys.modules["shardkit"]
