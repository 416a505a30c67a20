"""Peak memory of a command's whole process tree, sampled: the summed PSS (a page shared by several processes
counted once) and each process's own peak PSS / USS. Not a test: run it by hand and read the line.

    .venv/bin/python bench/peak_pss.py -- .venv/bin/wclip score --input 'shards/{00000..00007}.tar' \\
        --stats stats.safetensors --output /tmp/scores --no-progress

docs/benchmarks.md used it for `wclip score` on 8 and on 64 shards (memory flat in the number of shards).
"""

from __future__ import annotations

import argparse
import sys

import benchkit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--every", type=float, default=0.3, help="seconds between samples")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given")
    ran = benchkit.run(command, interval=args.every, quiet=True)
    root = ran.memory.pid
    peaks = {(pid, "command" if pid == root else "child"): (pss >> 10, uss >> 10)
             for pid, (pss, uss) in ran.memory.per_process.items()}
    print(f"exit {ran.returncode}; peak summed PSS {ran.memory.peak_pss_kb >> 10} MB; per process (pid, role): "
          f"(peak PSS, peak USS) MB {dict(sorted(peaks.items()))}")
    return ran.returncode


if __name__ == "__main__":
    sys.exit(main())
