"""Peak memory of a command's whole process tree, sampled: the summed PSS (a page shared by several processes
counted once) and each process's own peak PSS / USS. Not a test: run it by hand and read the line.

    .venv/bin/python bench/peak_pss.py -- .venv/bin/wclip score --input 'shards/{00000..00007}.tar' \\
        --stats stats.safetensors --output /tmp/scores --no-progress

docs/benchmarks.md used it for `wclip score` on 8 and on 64 shards (memory flat in the number of shards).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--every", type=float, default=0.3, help="seconds between samples")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak_total, peaks = 0, {}
    while proc.poll() is None:
        total = 0
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.Error:
            break
        for q in tree:
            try:
                m = q.memory_full_info()
            except psutil.Error:
                continue
            role = "command" if q.pid == proc.pid else "child"
            peaks[(q.pid, role)] = max(peaks.get((q.pid, role), (0, 0)), (m.pss >> 20, m.uss >> 20))
            total += m.pss >> 20
        peak_total = max(peak_total, total)
        time.sleep(args.every)
    print(f"exit {proc.returncode}; peak summed PSS {peak_total} MB; per process (pid, role): (peak PSS, peak USS) MB "
          f"{dict(sorted(peaks.items()))}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
