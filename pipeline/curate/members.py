"""Tar members on their way from an input shard into a new one: safe names, and bytes in bounded pieces.

Names. A new shard's member is named ``{key}.{ext}`` from its input name with the key made safe to extract
(:func:`safe_key`): empty and ``.`` path components are dropped (``/abs/x`` -> ``abs/x``, ``a//b`` ->
``a/b``), a ``..`` component becomes ``%2E%2E`` and a NUL ``%00``, so ``tar x`` of a new shard writes only
inside its folder. Ordinary names (``dir/000123.jpg``) are unchanged.

Bytes. A member up to :data:`SPOOL_BYTES` is read into memory; a larger one (kept with ``--include-failed``
although scoring skipped it) is copied through a temporary file in :data:`COPY_CHUNK` pieces and written the
same way, so a copy task's memory does not grow with a member's size.
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from typing import Iterator, Union

#: Members larger than this are spooled to a temporary file instead of being held in memory.
SPOOL_BYTES = 8 << 20
#: The pieces a spooled member is copied in.
COPY_CHUNK = 1 << 20

Data = Union[bytes, "Spooled"]


class Spooled:
    """A member's bytes in a temporary file (removed on :meth:`close`, or when collected)."""

    def __init__(self, source):
        self.file = tempfile.TemporaryFile()
        shutil.copyfileobj(source, self.file, COPY_CHUNK)
        self.size = self.file.tell()

    def chunks(self) -> Iterator[bytes]:
        self.file.seek(0)
        while chunk := self.file.read(COPY_CHUNK):
            yield chunk

    def close(self) -> None:
        self.file.close()


def read_member(tar, info) -> Data:
    """The bytes of the tar's current member ``info``: in memory up to :data:`SPOOL_BYTES`, else
    :class:`Spooled`. Read it before the stream moves to the next member."""
    source = tar.extractfile(info)
    return source.read() if info.size <= SPOOL_BYTES else Spooled(source)


def member_size(data: Data) -> int:
    return len(data) if isinstance(data, bytes) else data.size


def member_chunks(data: Data) -> Iterator[bytes]:
    """The member's bytes in pieces of at most :data:`COPY_CHUNK` (in memory ones: as they are)."""
    if isinstance(data, bytes):
        yield data
    else:
        yield from data.chunks()


def safe_key(key: str) -> str:
    """``key`` as a relative path that stays inside its folder (see the module's docstring)."""
    parts = [p for p in key.replace("\0", "%00").split("/") if p not in ("", ".")]
    return "/".join("%2E%2E" if p == ".." else p for p in parts)


def member_name(name: str) -> str:
    """A member's name in a new shard: ``{safe key}.{ext}`` from its input ``name`` (the extension as it was,
    everything after the first dot of the base name)."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return safe_key(posixpath.join(directory, stem) if directory else stem) + dot + ext.replace("\0", "%00")
