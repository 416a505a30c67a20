"""User text (captions, keys, URLs, statuses, file names) in the card's Markdown, shown as text and nothing else.

:func:`text` is for table cells and prose: every run of whitespace or control characters (newlines included)
becomes one space; ``&``, ``<`` and ``>`` become entities (no raw HTML, no ``<autolink>``); ``\\``, `````,
``*``, ``[``, ``]`` and ``|`` get a backslash (no image ``![..](..)``, no link, no code span, no emphasis by
``*``, no table cell break); ``://`` and ``www.`` get one too, so no bare URL is turned into a link. A Markdown
renderer shows the original characters. :func:`code` puts a path in a code span it cannot leave.
"""

from __future__ import annotations

import re

_SPACE = re.compile(r"[\s\x00-\x1f\x7f\u2028\u2029]+")
_PUNCT = re.compile(r"([\\`*\[\]|])")
_AUTOLINK = re.compile(r"(?i)(://|www\.)")


def text(value) -> str:
    """``value`` as Markdown text that renders as exactly its characters (see the module's docstring)."""
    s = _SPACE.sub(" ", str(value))
    s = _PUNCT.sub(r"\\\1", s)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _AUTOLINK.sub(lambda m: ":\\/\\/" if m.group(1) == "://" else m.group(1)[:3] + "\\.", s)


def code(value) -> str:
    """``value`` (one line) as a code span: fenced by more backticks than it holds in a row, padded when it
    starts or ends with a backtick."""
    s = _SPACE.sub(" ", str(value))
    fence = "`" * (max((len(run) for run in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"
