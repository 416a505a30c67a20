"""The ``wclip`` command line: one subcommand per module in :mod:`pipeline.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; modules keep heavy imports inside ``run`` so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline import __version__
from pipeline.commands import HelpFormatter
from pipeline.errors import WclipError

COMMANDS = ("fit", "score", "dedup", "filter", "card", "demo", "world", "train-demo")


def _module(name: str):
    return importlib.import_module(f"pipeline.commands.{name.replace('-', '_')}")


_REQUIRED = "the following arguments are required: "


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (what is wrong, where the flags are), not the usage
    text: ``wclip score: error: --stats is required; see `wclip score --help```, exit code 2."""

    def error(self, message: str):
        if message.startswith(_REQUIRED):
            missing = message[len(_REQUIRED):]
            message = f"{missing} {'are' if ', ' in missing else 'is'} required"
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="wclip",
        description="Score, filter and document image-caption datasets with the Whitened CLIP likelihood.")
    parser.add_argument("--version", action="version", version=f"wclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        mod = _module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # wclip's own progress at INFO; other libraries (open_clip, fsspec, ...) only when they warn
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("wclip", "pipeline"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args._run(args) or 0)
    except WclipError as exc:
        print(f"wclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a permission, a vanished mount: the message names the path
        if args.verbose:
            raise
        print(f"wclip {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"wclip {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
