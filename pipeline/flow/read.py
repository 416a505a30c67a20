"""Shard URLs and tar streaming: expand brace patterns and globs, open local / fsspec / ``pipe:`` URLs,
decompress (gzip, zstd, bzip2, xz), and group tar members into samples by ``__key__`` (webdataset's
naming convention).

Three kinds of trouble are kept apart: the *transport* failing or stalling (:class:`TransportError`: the
shard is retried, then recorded as failed), the *archive* being structurally truncated or corrupt (damage:
the samples before it are kept and the damage is recorded), and one *member* being unusable (that
sample's row says why).
"""

from __future__ import annotations

import glob
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

from braceexpand import braceexpand

from pipeline.config import MAX_MEMBER_BYTES, STALL_TIMEOUT
from pipeline.errors import TransportError
from pipeline.flow.transport import damage_errors, decompressed, open_shard

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")
_NAME_SUFFIXES = SHARD_SUFFIXES + (".parquet",)  # stripped from input names to name their outputs
_GLOB_CHARS = "*?["


def expand_shards(patterns) -> list[str]:
    """Expand brace patterns (``data/{00000..00099}.tar``) and local folders into shard URLs.

    Order is kept and duplicates are dropped. A local folder stands for the ``*.tar`` files in it.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if url.startswith("pipe:"):
                urls.append(url)
            elif any(c in url for c in _GLOB_CHARS):
                matched = _glob(url)
                if not matched:
                    raise ValueError(f"the pattern {url!r} matched no file")
                urls.extend(matched)
            elif "://" not in url and os.path.isdir(url):
                urls.extend(sorted(os.path.join(url, f) for f in os.listdir(url) if f.endswith(SHARD_SUFFIXES)))
            else:
                urls.append(url)
    unique = list(dict.fromkeys(urls))
    if not unique:
        raise ValueError(f"no shards matched {list(patterns)!r}")
    return unique


def _glob(pattern: str) -> list:
    """A shell-style glob (``dir/*.tar``, ``s3://b/x/*.tar``), expanded here because a quoted one reaches us
    unexpanded; sorted."""
    if "://" not in pattern:
        return sorted(glob.glob(pattern))
    import fsspec

    fs, _, _ = fsspec.get_fs_token_paths(pattern)
    scheme = pattern.split("://")[0]
    return sorted(m if "://" in m else f"{scheme}://{m}" for m in fs.glob(pattern))


def shard_name(url: str) -> str:
    """The shard's file name without its tar suffix: the name of its outputs (``00042`` for ``s3://b/00042.tar``)."""
    if url.startswith("pipe:"):
        tokens = [t for t in url[5:].split() if not t.startswith("-")]
        url = tokens[-1] if tokens else url[5:]
    base = posixpath.basename(url.rstrip("/").split("?")[0])
    for suffix in _NAME_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def check_unique_names(urls) -> None:
    """Refuse input shards whose outputs would share a name (``a/00000.tar`` and ``b/00000.tar``)."""
    from pipeline.errors import ConfigError

    seen: dict = {}
    for url in urls:
        name = shard_name(url)
        if name in seen:
            raise ConfigError(f"two input shards share the output name {name!r}: {seen[name]} and {url}; "
                              f"score them into different --output folders")
        seen[name] = url


def split_member(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``): the key is everything before the first dot of the
    base name; the extension (lower-cased) the rest."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = posixpath.join(directory, stem) if directory else stem
    return key, ext.lower() if dot else ""


def member_key(info: tarfile.TarInfo) -> Optional[tuple[str, str]]:
    """``(key, ext)`` of a tar member that belongs to a sample (:func:`split_member`); None for one that does
    not: anything but a regular file, and names whose key starts with ``__`` or has an empty base name."""
    if not info.isfile():
        return None
    key, ext = split_member(info.name)
    if key.startswith("__") or posixpath.basename(key) == "":
        return None
    return key, ext


class Member(NamedTuple):
    """One sample member of a streamed tar. Call :meth:`read` for its bytes before taking the next member."""

    key: str
    ext: str
    info: tarfile.TarInfo
    tar: tarfile.TarFile

    def read(self) -> bytes:
        return self.tar.extractfile(self.info).read()


def iter_members(url: str) -> Iterator[Member]:
    """The sample members of a shard (:func:`member_key`), in tar order, keyed as :class:`ShardReader` keys
    its samples (:func:`clean_key`); the shard is closed when the iteration ends or the iterator is closed."""
    with open_shard(url) as stream, tarfile.open(fileobj=decompressed(stream), mode="r|") as tar:
        for info in tar:
            named = member_key(info)
            if named is not None:
                yield Member(clean_key(named[0])[0], named[1], info, tar)


class _TailReader:
    """A read-only stream wrapper that remembers the last bytes read and how many were read in all."""

    KEEP = 1 << 16

    def __init__(self, raw):
        self.raw = raw
        self.total = 0
        self.tail = b""

    def read(self, n=-1):
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.KEEP:]
        return data

    def block_at(self, offset: int, size: int = 512) -> bytes:
        start = offset - (self.total - len(self.tail))
        return self.tail[start:start + size] if 0 <= start <= len(self.tail) else b""


@dataclass
class RawSample:
    """The members of one sample, as bytes, with its position in the shard."""

    key: str
    index: int
    members: dict = field(default_factory=dict)  # extension -> bytes
    error: Optional[str] = None  # set when the tar broke while this sample was being read
    warnings: list = field(default_factory=list)  # problems that do not stop scoring (odd member names)
    skipped: list = field(default_factory=list)  # members not read, with the reason


def clean_key(key: str) -> tuple:
    """(key, warning): a member name that is not valid UTF-8 (tarfile keeps its bytes as surrogates) is
    shown with ``\\x`` escapes, so it can be written to Parquet, and a warning says so."""
    try:
        key.encode("utf-8")
        return key, None
    except UnicodeEncodeError:
        shown = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return shown, f"member name is not valid UTF-8; the key is shown with \\x escapes: {shown}"


def listed(names, shown: int = 3) -> str:
    """The first ``shown`` of ``names``, comma-separated, and how many more there are: ``a, b, c and 2 more``."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _joined(*parts: Optional[str]) -> Optional[str]:
    """The non-empty ``parts`` joined with ``; `` (None when there are none)."""
    return "; ".join(p for p in parts if p) or None


class KeyGrouping:
    """Tar members -> samples by ``__key__`` (webdataset's convention), made exact: a member starts a new
    sample when its key differs from the current sample's *or* the current sample already has its extension
    (the same key written twice in a row: webdataset refuses such a tar). A sample whose key an earlier
    sample of the shard had is still its own sample, never merged into that one; its ``error`` says so (its
    row's status is ``read``) and :meth:`duplicates_note` counts them for the shard's record."""

    def __init__(self):
        self.current: Optional[RawSample] = None
        self.count = 0  # samples started
        self._exts: set = set()  # extensions of the current sample
        self._first: dict = {}  # key -> index of its first sample
        self.duplicates: list = []  # (key, index) of the samples that repeat a key

    def add(self, name: str, ext: str) -> Optional[RawSample]:
        """Place member (``name``, ``ext``) of :func:`member_key` in :attr:`current`; returns the sample it
        finished, if any."""
        key, warning = clean_key(name)
        done = None
        if self.current is not None and (key != self.current.key or ext in self._exts):
            done, self.current = self.current, None
        if self.current is None:
            self.current = RawSample(key=key, index=self.count, warnings=[warning] if warning else [])
            self._exts = set()
            first = self._first.setdefault(key, self.count)
            if first != self.count:
                self.duplicates.append((key, self.count))
                self.current.error = (f"duplicate key: sample {first} of this shard has the same key {key!r}; this "
                                      f"one is read as its own row (not merged into that one) but not marked ok, "
                                      f"since its key does not identify it: give each sample its own key")
            self.count += 1
        self._exts.add(ext)
        return done

    def duplicates_note(self) -> Optional[str]:
        """One line on the samples that repeat a key (None when none do)."""
        if not self.duplicates:
            return None
        shown = listed(f"{key} at sample {index}" for key, index in self.duplicates)
        n = len(self.duplicates)
        return (f"{n} sample{'s' if n > 1 else ''} repeat{'' if n > 1 else 's'} the key of an earlier sample "
                f"({shown}): each is its own row, with status read")


class ShardReader:
    """Iterate the samples of one tar shard; ``damage`` describes a truncated or corrupt archive, if any.

    Samples before the damage are yielded normally; a sample cut by it is yielded with ``error`` set. A
    member over ``max_member_bytes`` is skipped (its sample says so). Transport trouble raises
    :class:`TransportError`.
    """

    def __init__(self, url: str, fileobj=None, max_member_bytes: int = MAX_MEMBER_BYTES,
                 stall_timeout: float = STALL_TIMEOUT):
        self.url = url
        self._fileobj = fileobj
        self.max_member_bytes = max_member_bytes
        self.stall_timeout = stall_timeout
        self.damage: Optional[str] = None
        self.skipped_members = 0

    def __iter__(self) -> Iterator[RawSample]:
        stream = self._fileobj if self._fileobj is not None else open_shard(self.url, self.stall_timeout)
        try:
            yield from self._samples(_TailReader(decompressed(stream)))
        finally:
            if self._fileobj is None:
                stream.close()

    def _samples(self, reader: "_TailReader") -> Iterator[RawSample]:
        groups = KeyGrouping()
        try:
            tar = tarfile.open(fileobj=reader, mode="r|")
        except tarfile.ReadError as exc:  # not a tar at all (header unreadable)
            raise OSError(f"{self.url}: not a readable tar file ({exc})") from exc
        with tar:
            while True:
                try:
                    info = tar.next()
                    if info is None:
                        self._check_end(tar, reader, groups.count)
                        break
                    named = member_key(info)
                    if named is None:
                        self.skipped_members += 1
                        continue
                    done = groups.add(*named)
                    if done is not None:
                        yield done
                    self._add_member(tar, info, named[1], groups.current)
                except TransportError:
                    raise
                except damage_errors() as exc:
                    self._damaged(f"tar damaged after {groups.count} samples: {exc}")
                    if groups.current is not None:
                        groups.current.error = _joined(
                            groups.current.error, f"the shard is truncated or corrupt inside this sample ({exc}); "
                                                  f"members read: {sorted(groups.current.members) or 'none'}")
                    break
        self._damaged(groups.duplicates_note())
        if groups.current is not None:
            yield groups.current

    def _damaged(self, note: Optional[str]) -> None:
        self.damage = _joined(self.damage, note)

    def _add_member(self, tar, info, ext: str, sample: RawSample) -> None:
        if info.size > self.max_member_bytes:
            sample.skipped.append(f"member .{ext} is {info.size} bytes, over the {self.max_member_bytes}-byte "
                                  f"limit (raise --max-member-bytes if such members are legitimate)")
            return
        sample.members[ext] = tar.extractfile(info).read()

    def _check_end(self, tar, reader: "_TailReader", samples: int) -> None:
        """A tar must end with a zero block; a missing one means the archive was cut short (also inside a
        compressed stream that was itself completed, e.g. a cut tar gzipped afterwards)."""
        block = reader.block_at(tar.offset)
        if len(block) < 512 or block.count(0) != 512:
            self._damaged(f"tar has no end-of-archive marker: the archive was cut short after {samples} "
                          f"samples ({reader.total} bytes); later samples, if any, are lost")
