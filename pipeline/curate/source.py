"""The kept samples of one input shard, read for copying: tar members grouped into samples the way
:class:`pipeline.flow.read.ShardReader` groups them (so a sample's position is the scores' ``index``), or
img2dataset's ``files`` folders and image Parquet files read by the scorer's own readers
(:class:`RecordReader`), each kept row matched to its sample, and every kept sample that cannot be copied
given a reason.

Which copy is kept. A row of the scores names its sample by ``index`` (the sample's position in the
shard) and ``key``: the sample at that position is copied when its key agrees. A key that occurs twice
in a shard is two samples with two rows; only the copy whose row was kept is copied, the other is not.
Rows without an ``index`` (scores from other tools) take the samples with their key in tar order.

A kept sample is *unreadable* when the shard is truncated or corrupt at or before it, when the archive
ends without its end-of-archive marker right after it (it may have lost members), or when the shard no
longer holds it at its position (the shard differs from the one that was scored). Such a sample is not
copied; it gets an :class:`Outcome` with a short ``kind`` and a ``reason`` a person can act on. A shard
that cannot be opened (missing, transport failure) raises instead: that is retried, not recorded.
"""

from __future__ import annotations

import tarfile
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from pipeline.curate.members import read_member
from pipeline.errors import TransportError
from pipeline.flow.read import KeyGrouping, member_key
from pipeline.flow.transport import damage_errors, decompressed, open_shard

DAMAGED = "shard truncated or corrupt"
CUT_SHORT = "shard cut short after this sample"
CHANGED = "shard differs from the scored one"
UNREADABLE_MEMBER = "member not readable"


@dataclass
class Sample:
    """One sample of a shard: its position, key and, when wanted, its members' headers and bytes."""

    index: int
    key: str
    members: list = field(default_factory=list)  # (TarInfo, bytes or Spooled) in tar order; wanted samples
    kind: Optional[str] = None     # set when this sample cannot be copied
    reason: Optional[str] = None


@dataclass(frozen=True)
class Outcome:
    """What became of one kept row: its sample (copy it), or why it cannot be copied."""

    row: dict
    sample: Optional[Sample] = None
    kind: Optional[str] = None
    reason: Optional[str] = None


class _Tail:
    """A read-only stream that remembers its last few reads, to look at the block where a tar ended."""

    KEEP = 4

    def __init__(self, raw):
        self.raw, self.total, self.recent = raw, 0, []

    def read(self, n=-1):
        data = self.raw.read(n)
        if data:
            self.total += len(data)
            self.recent = (self.recent + [data])[-self.KEEP:]
        return data

    def ends_at(self, offset: int) -> bool:
        """True when a zero block (the end-of-archive marker) starts at ``offset``."""
        buf = b"".join(self.recent)
        start = offset - (self.total - len(buf))
        block = buf[start:start + 512] if 0 <= start <= len(buf) else b""
        return len(block) == 512 and block.count(0) == 512


class SampleReader:
    """The samples of one shard in tar order; the members of those ``wanted(index, key)`` selects are read.

    A sample cut by damage comes with ``kind``/``reason`` set and iteration stops; :attr:`damage` then says
    what happened and :attr:`count` how many samples were seen.
    """

    def __init__(self, url: str, wanted: Callable[[int, str], bool]):
        self.url, self.wanted = url, wanted
        self.damage: Optional[str] = None
        self.count = 0

    def __iter__(self) -> Iterator[Sample]:
        with open_shard(self.url) as stream:
            tail = _Tail(decompressed(stream))
            try:
                tar = tarfile.open(fileobj=tail, mode="r|")
            except TransportError:
                raise
            except damage_errors() as exc:
                self.damage = f"not a readable tar ({exc})"
                return
            with tar:
                yield from self._samples(tar, tail)

    def _samples(self, tar, tail: _Tail) -> Iterator[Sample]:
        current, last_is_sample = None, False
        groups = KeyGrouping()
        while True:
            try:
                info = tar.next()
                if info is None:
                    break
                named = member_key(info)
                last_is_sample = named is not None
                if named is None:
                    continue
                if groups.add(*named) is not None:  # a new sample starts here, as ShardReader splits them
                    self.count += 1
                    yield current
                    current = None
                if current is None:
                    current = Sample(groups.current.index, groups.current.key)
                if self.wanted(current.index, current.key):
                    current.members.append((info, read_member(tar, info)))
            except TransportError:
                raise
            except damage_errors() as exc:
                self.damage = f"the shard is truncated or corrupt after {self.count} samples ({exc})"
                if current is not None:
                    current.kind = DAMAGED
                    current.reason = (f"the shard is truncated or corrupt in or right after this sample ({exc}), "
                                      "so it may have lost members")
                    self.count += 1
                    yield current
                return
        if not tail.ends_at(tar.offset):
            seen = self.count + (current is not None)
            self.damage = (f"the archive ends without its end-of-archive marker after {seen} samples "
                           f"({tail.total} bytes): it was cut short")
            if current is not None and last_is_sample:
                current.kind, current.reason = CUT_SHORT, (
                    "the archive ends right after this sample without its end-of-archive marker (cut short), so "
                    "the sample may have lost members")
        if current is not None:
            self.count += 1
            yield current


class RecordReader:
    """The samples of one img2dataset ``files`` folder or image Parquet file, read by the scorer's own readers
    (:func:`pipeline.flow.formats.open_reader`), so positions and keys are the scores' ``index`` and ``key``.
    A wanted sample's members become tar members ``{key}.{ext}`` holding their bytes as they are (a file's
    bytes; a Parquet row's image bytes and caption, and its other columns as the ``.json`` the scorer read).
    A member that could not be read (a dangling link, names differing only in case) makes the sample
    unreadable. Same interface as :class:`SampleReader`."""

    def __init__(self, url: str, wanted: Callable[[int, str], bool], input_format: str):
        self.url, self.wanted, self.input_format = url, wanted, input_format
        self.damage: Optional[str] = None
        self.count = 0

    def __iter__(self) -> Iterator[Sample]:
        import sys

        from pipeline.config import InputConfig
        from pipeline.flow.formats import open_reader

        reader = open_reader(self.url, InputConfig(input_format=self.input_format, max_member_bytes=sys.maxsize))
        for raw in reader:
            self.count += 1
            sample = Sample(raw.index, raw.key)
            if self.wanted(raw.index, raw.key):
                problem = "; ".join(([raw.error] if raw.error else []) + raw.skipped)
                if problem:
                    sample.kind, sample.reason = UNREADABLE_MEMBER, f"not copied: {problem}"
                else:
                    sample.members = [(_member_info(raw.key, ext, data), data) for ext, data in raw.members.items()]
            yield sample
        if self.input_format == "parquet":  # a files folder's note (folders inside it) loses no sample
            self.damage = reader.damage


def _member_info(key: str, ext: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: a resumed run writes identical tars
    return info


def open_samples(url: str, wanted: Callable[[int, str], bool], input_format: str = "webdataset"):
    """The sample reader of one input shard in ``input_format`` (one of ``pipeline.config.INPUT_FORMATS``)."""
    if input_format == "webdataset":
        return SampleReader(url, wanted)
    return RecordReader(url, wanted, input_format)


def _lost(reader, index) -> tuple:
    if reader.damage:
        return DAMAGED, f"not read: {reader.damage}"
    where = f" at #{index}" if index is not None else ""
    return CHANGED, (f"the shard holds {reader.count} samples and none of them is this one{where}: the shard differs "
                     "from the one that was scored")


def kept_samples(url: str, rows: list, input_format: str = "webdataset") -> Iterator[Outcome]:
    """One :class:`Outcome` per kept row of shard ``url`` (in ``input_format``), in output order (the shard's
    order; rows no sample matched come last)."""
    if rows and all(r.get("index") is not None for r in rows):
        yield from _by_index(url, rows, input_format)
    else:
        yield from _by_key(url, rows, input_format)


def _by_index(url: str, rows: list, input_format: str) -> Iterator[Outcome]:
    wanted: dict = {}
    for row in sorted(rows, key=lambda r: r["index"]):
        wanted.setdefault(int(row["index"]), []).append(row)
    reader = open_samples(url, lambda index, key: index in wanted, input_format)
    for sample in reader:
        found = wanted.pop(sample.index, None)
        if not found:
            continue
        row, *twins = found
        if sample.kind:
            yield Outcome(row, None, sample.kind, sample.reason)
        elif sample.key != row["key"]:
            yield Outcome(row, None, CHANGED, f"sample #{sample.index} of the shard has key {sample.key!r}, not "
                                              f"{row['key']!r} as scored: the shard differs from the scored one")
        else:
            yield Outcome(row, sample)
        for twin in twins:
            yield Outcome(twin, None, CHANGED, f"another kept row already names sample #{sample.index}")
    for index, left in sorted(wanted.items()):
        for row in left:
            yield Outcome(row, None, *_lost(reader, index))


def _by_key(url: str, rows: list, input_format: str) -> Iterator[Outcome]:
    wanted: dict = {}
    for row in rows:
        wanted.setdefault(row["key"], deque()).append(row)
    reader = open_samples(url, lambda index, key: bool(wanted.get(key)), input_format)
    for sample in reader:
        queue = wanted.get(sample.key)
        if not queue:
            continue
        row = queue.popleft()
        yield Outcome(row, None, sample.kind, sample.reason) if sample.kind else Outcome(row, sample)
    for row in rows:
        queue = wanted.get(row["key"])
        if queue and queue[0] is row:
            queue.popleft()
            yield Outcome(row, None, *_lost(reader, None))
