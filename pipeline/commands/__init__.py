"""Command modules of the wclip CLI: each defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``, and keeps heavy imports inside ``run`` so ``--help`` is instant."""

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, plus ``(default: X)`` where a flag has a real default its help does not already say."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or action.required
                or "default" in text or not action.option_strings):
            return text
        return f"{text} (default: {default})"


class DescribedHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps a command's description and epilog as written."""
