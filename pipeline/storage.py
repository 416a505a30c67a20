"""One storage layer for every file wclip reads or writes: local paths and fsspec URLs (``s3://``,
``gs://``, ``http(s)://``, ``memory://``) alike, and the one crash-safe write.

A crash-safe write goes to a hidden temporary name beside the target (``.NAME.XXXXXXXX.tmp``) and is
renamed into place when complete, so readers see the whole file or nothing; a failed write removes its
temporary file.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import posixpath
import uuid
from typing import Iterator

TMP_SUFFIX = ".tmp"


def is_url(path) -> bool:
    """True for ``scheme://`` paths (anything fsspec resolves other than a plain local path)."""
    return "://" in str(path)


def filesystem(path):
    """(fsspec filesystem, path inside it) for a local path or URL."""
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(str(path))
    return fs, paths[0]


def uncached(path):
    """:func:`filesystem`, minus any cached listing of ``path``: other processes write these folders."""
    fs, p = filesystem(path)
    fs.invalidate_cache(p)
    return fs, p


def join(base, *names: str) -> str:
    """Join file names onto a local folder or URL."""
    base = str(base)
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *names)
    return os.path.join(base, *names)


def basename(path) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def exists(path) -> bool:
    fs, p = uncached(path)
    return fs.exists(p)


def is_dir(path) -> bool:
    fs, p = uncached(path)
    return fs.isdir(p)


def makedirs(path) -> None:
    fs, p = filesystem(path)
    fs.makedirs(p, exist_ok=True)


def listdir(path) -> list:
    """Full paths/URLs of the entries of a folder (empty when it does not exist), sorted by name."""
    fs, p = uncached(path)
    if not fs.exists(p):
        return []
    return sorted(join(path, basename(entry)) for entry in fs.ls(p, detail=False))


def list_files(folder, suffix: str = "") -> list:
    """Full paths/URLs of the files (not folders) in a folder whose names end with ``suffix``, sorted by
    name; empty when the folder does not exist."""
    fs, p = uncached(folder)
    if not fs.exists(p):
        return []
    return sorted(join(folder, basename(entry["name"])) for entry in fs.ls(p, detail=True)
                  if is_file_entry(fs, entry) and basename(entry["name"]).endswith(suffix))


def is_file_entry(fs, entry: dict) -> bool:
    """Whether an entry of ``fs.ls(..., detail=True)`` is a file, a symbolic link to one included (fsspec lists
    a link as type ``other``)."""
    if entry.get("type") == "file":
        return True
    return bool(entry.get("islink")) and fs.isfile(entry["name"])


def remove_empty_folder(path) -> None:
    """Remove a local folder wclip made once it is empty; object stores have no folders to remove."""
    fs, p = uncached(path)
    if "file" in _protocols(fs) and fs.isdir(p) and not fs.ls(p):
        fs.rmdir(p)


def local_file(path):
    """The local path of ``path`` (a plain path or a ``file://`` URL), or None on any other file system."""
    fs, p = filesystem(path)
    return p if "file" in _protocols(fs) else None


def _protocols(fs) -> tuple:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


@contextlib.contextmanager
def local_path(path) -> Iterator[str]:
    """A local file path holding the contents of ``path``: the path itself when it is local, else a
    temporary copy (removed afterwards) for readers that need a real file."""
    if not is_url(path):
        yield str(path)
        return
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="wclip-")
    local = os.path.join(folder, basename(path) or "download")
    try:
        with open_read(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sha256(path) -> str:
    """sha256 of a file's bytes, streamed."""
    import hashlib

    digest = hashlib.sha256()
    with open_read(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bytes(path) -> bytes:
    fs, p = filesystem(path)
    return fs.cat_file(p)


def open_read(path):
    """A binary file object for reading ``path``."""
    fs, p = filesystem(path)
    return fs.open(p, "rb")


def size(path) -> int:
    fs, p = filesystem(path)
    return int(fs.size(p))


def remove(path) -> None:
    """Delete a file wclip wrote (callers own that decision)."""
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p)


def temporary_name(path) -> str:
    """The hidden temporary name beside ``path`` used while it is being written."""
    parent, name = posixpath.split(str(path)) if is_url(path) else os.path.split(str(path))
    tmp = f".{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    return posixpath.join(parent, tmp) if is_url(path) else os.path.join(parent, tmp)


def is_temporary(name: str) -> bool:
    name = basename(name)
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


@contextlib.contextmanager
def open_atomic(path) -> Iterator:
    """Open ``path`` for writing in binary mode; it appears (by rename) only if the block completes.

    On any error the temporary file is removed and the error propagates; an ``OSError`` (a full disk, a
    permission) is re-raised naming ``path``, since the operating system's message does not.
    """
    fs, p = filesystem(path)
    parent = posixpath.dirname(p)
    tmp = posixpath.join(parent, basename(temporary_name(p)))
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as fh:
            yield fh
        fs.mv(tmp, p)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        if isinstance(exc, OSError) and str(path) not in str(exc):
            raise OSError(exc.errno, f"{exc.strerror or exc} (writing {path})") from exc
        raise


def write_atomic(path, data: bytes) -> None:
    """Write bytes so the file appears complete or not at all."""
    with open_atomic(path) as fh:
        fh.write(data)


def jsonable(value):
    """Plain-JSON copy of a value: NumPy scalars and arrays become Python numbers and lists, NaN becomes
    null and infinities the strings ``"inf"`` / ``"-inf"`` (JSON has no non-finite numbers)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    return value


def dumps_json(obj, indent: int = 1, *, sort_keys: bool = True) -> bytes:
    return json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False).encode()


def write_json(path, obj, indent: int = 1, *, sort_keys: bool = True) -> None:
    """Write ``obj`` as JSON, crash-safe (see :func:`jsonable` for non-finite numbers); ``sort_keys=False``
    keeps the dicts' own order (reports meant for people)."""
    write_atomic(path, dumps_json(obj, indent, sort_keys=sort_keys))


def read_json(path):
    return json.loads(read_bytes(path))


def remove_stale_temporaries(folder) -> int:
    """Delete temporary files a killed run of wclip left in ``folder``; returns how many."""
    stale = [e for e in listdir(folder) if is_temporary(e)]
    for entry in stale:
        remove(entry)
    return len(stale)


class Held(Exception):
    """:func:`exclusive` found the lock held by another process; ``holder`` is what that process recorded."""

    def __init__(self, path, holder: dict):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive(path, holder: dict) -> Iterator[None]:
    """Hold the lock file ``path`` (a local path) for the block, recording ``holder`` (JSON) in it; raise
    :class:`Held` at once, without waiting, when another process holds it.

    The lock is ``fcntl.flock`` on the file: the operating system releases it when the process ends, however
    it ends (``kill -9`` included), so a crashed run never wedges the path. The file is never deleted (a
    process may have it open to lock it: deleting it would let two processes lock two files of one name).
    Locks are per open file, so two claims in one process exclude each other too. NFS emulates ``flock``
    with byte-range locks, which hold across clients.
    """
    import fcntl

    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Held(path, _recorded(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, dumps_json(holder), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the next holder records itself; a reader meanwhile finds nothing
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _recorded(fd: int) -> dict:
    """What the holder of a lock file wrote in it ({} while it has not written yet)."""
    try:
        made = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        return {}
    return made if isinstance(made, dict) else {}
