"""Shard URLs and tar streaming: expand brace patterns, open local / fsspec / ``pipe:`` URLs, and
group tar members into samples by ``__key__`` (webdataset's naming convention)."""

from __future__ import annotations

import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

from braceexpand import braceexpand

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst")


def expand_shards(patterns) -> list[str]:
    """Expand brace patterns (``data/{00000..00099}.tar``) and local folders into shard URLs.

    Order is kept and duplicates are dropped. A local folder stands for the ``*.tar`` files in it.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if "://" not in url and not url.startswith("pipe:") and os.path.isdir(url):
                urls.extend(sorted(os.path.join(url, f) for f in os.listdir(url) if f.endswith(SHARD_SUFFIXES)))
            else:
                urls.append(url)
    unique = list(dict.fromkeys(urls))
    if not unique:
        raise ValueError(f"no shards matched {list(patterns)!r}")
    return unique


def shard_name(url: str) -> str:
    """The shard's file name without its tar suffix: the name of its outputs (``00042`` for ``s3://b/00042.tar``)."""
    if url.startswith("pipe:"):
        tokens = [t for t in url[5:].split() if not t.startswith("-")]
        url = tokens[-1] if tokens else url[5:]
    base = posixpath.basename(url.rstrip("/").split("?")[0])
    for suffix in SHARD_SUFFIXES:
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


def open_shard(url: str):
    """Open a shard for streaming reads: local path, any fsspec URL (s3://, gs://, http(s)://) or ``pipe:CMD``."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if "://" not in url or url.startswith("file://"):
        return open(url[7:] if url.startswith("file://") else url, "rb")
    import fsspec

    if url.startswith(("http://", "https://")):
        # One streaming GET: tar members are read in order, and servers without range requests work too.
        return fsspec.open(url, "rb", block_size=0).open()
    return fsspec.open(url, "rb").open()


def split_member(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``): the key is everything before the first dot of the
    base name; the extension (lower-cased) the rest."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = posixpath.join(directory, stem) if directory else stem
    return key, ext.lower() if dot else ""


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


class ShardReader:
    """Iterate the samples of one tar shard; ``damage`` describes a truncated or corrupt tail, if any.

    Samples before the damage are yielded normally; a sample cut by it is yielded with ``error`` set.
    """

    def __init__(self, url: str, fileobj=None):
        self.url = url
        self._fileobj = fileobj
        self.damage: Optional[str] = None
        self.skipped_members = 0

    def __iter__(self) -> Iterator[RawSample]:
        stream = self._fileobj if self._fileobj is not None else open_shard(self.url)
        reader = _TailReader(stream)
        current: Optional[RawSample] = None
        index = 0
        try:
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                while True:
                    try:
                        info = tar.next()
                        if info is None:
                            self._check_end(tar, reader, index + (current is not None))
                            break
                        if not info.isfile():
                            self.skipped_members += 1
                            continue
                        key, ext = split_member(info.name)
                        if key.startswith("__") or posixpath.basename(key) == "":
                            self.skipped_members += 1
                            continue
                        if current is not None and key != current.key:
                            yield current
                            index += 1
                            current = None
                        if current is None:
                            current = RawSample(key=key, index=index)
                        data = tar.extractfile(info).read()
                        if ext in current.members:
                            ext = f"{ext}.dup{len(current.members)}"
                        current.members[ext] = data
                    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
                        self.damage = f"tar damaged after {index + (current is not None)} samples: {exc}"
                        if current is not None:
                            current.error = (f"the shard is truncated or corrupt inside this sample ({exc}); "
                                             f"members read: {sorted(current.members) or 'none'}")
                        break
        except tarfile.ReadError as exc:  # not a tar at all (header unreadable)
            if index == 0 and current is None:
                raise OSError(f"{self.url}: not a readable tar file ({exc})") from exc
            self.damage = f"tar damaged: {exc}"
        finally:
            if self._fileobj is None:
                stream.close()
        if current is not None:
            yield current

    def _check_end(self, tar, reader: _TailReader, samples: int) -> None:
        """An uncompressed tar must end with a zero block; a missing one means the file was cut short."""
        if tar.fileobj.comptype != "tar":
            return
        block = reader.block_at(tar.offset)
        if len(block) < 512 or block.count(0) != 512:
            self.damage = (f"tar has no end-of-archive marker: the file was cut short after {samples} "
                           f"samples ({reader.total} bytes); later samples, if any, are lost")
