"""Opening a shard's bytes: local files, fsspec URLs (s3://, gs://, http(s)://) and ``pipe:`` commands,
guarded so that a failing or stalled transport raises :class:`pipeline.errors.TransportError` (retried,
then recorded as a failed shard) instead of hanging or passing for archive damage; and decompression by
magic number (gzip, zstd, bzip2, xz)."""

from __future__ import annotations

import bz2
import concurrent.futures
import gzip
import io
import lzma
import tarfile
import zlib

from pipeline.config import STALL_TIMEOUT
from pipeline.errors import TransportError


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))


def open_shard(url: str, stall_timeout: float = STALL_TIMEOUT):
    """Open a shard for streaming reads: local path, any fsspec URL (s3://, gs://, http(s)://) or ``pipe:CMD``.

    Remote and piped streams are guarded: an error of the transport, or no byte for ``stall_timeout``
    seconds, raises :class:`TransportError`.
    """
    if is_local(url):
        return open(url[7:] if url.startswith("file://") else url, "rb")
    try:
        if url.startswith("pipe:"):
            from webdataset.gopen import gopen

            raw = gopen(url, "rb")
        else:
            raw = _open_remote(url, stall_timeout)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise TransportError(f"{url}: could not open: {type(exc).__name__}: {exc}") from exc
    return _GuardedStream(raw, url, stall_timeout)


def _open_remote(url: str, stall_timeout: float):
    import fsspec

    if url.startswith(("http://", "https://")):
        import aiohttp

        # One streaming GET: tar members are read in order, and servers without range requests work too.
        # No total timeout (a big shard read slowly behind busy encoders is fine); a stalled socket is not.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=stall_timeout, sock_read=stall_timeout)
        return fsspec.open(url, "rb", block_size=0, client_kwargs={"timeout": timeout}).open()
    return fsspec.open(url, "rb").open()


class _GuardedStream(io.RawIOBase):
    """Reads a transport stream in a helper thread, so a stall becomes a :class:`TransportError` after
    ``stall_timeout`` seconds instead of a hang; the transport's own errors become TransportErrors too."""

    CHUNK = 1 << 20

    def __init__(self, raw, url: str, stall_timeout: float):
        super().__init__()
        self.raw, self.url, self.stall_timeout = raw, url, stall_timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wclip-read")
        self._buffer = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        if not self._buffer and not self._eof:
            self._buffer = self._fetch()
            self._eof = not self._buffer
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def _read(self) -> bytes:
        """What the transport has now, up to ``CHUNK`` bytes: a ``pipe:`` command's output is read with
        ``read1``, so a slow command's bytes reach the reader as they come (a plain ``read`` waited for a
        whole MiB: a small shard read slowly showed nothing until its end, and a source slower than a MiB
        per ``stall_timeout`` looked stalled)."""
        stream = getattr(self.raw, "stream", None)  # webdataset's Pipe around the command's stdout
        if hasattr(stream, "read1") and hasattr(self.raw, "check_status"):
            data = stream.read1(self.CHUNK)
            self.raw.check_status()  # as Pipe.read does after each read: a command that failed raises
            return data
        return self.raw.read(self.CHUNK)

    def _fetch(self) -> bytes:
        future = self._pool.submit(self._read)
        try:
            return future.result(timeout=self.stall_timeout)
        except concurrent.futures.TimeoutError:
            self._abort()
            raise TransportError(f"{self.url}: no data for {self.stall_timeout:g} s (stalled read; "
                                 f"raise --stall-timeout for slow sources)") from None
        except Exception as exc:
            raise TransportError(f"{self.url}: read failed: {type(exc).__name__}: {exc}") from exc

    def _abort(self) -> None:
        """Unblock a stalled reader: kill a ``pipe:`` command and its children (a blocked read of the
        other transports ends by their own socket timeout); the raw stream is left to the garbage
        collector, since closing it would wait for the blocked read."""
        self._aborted = True
        proc = getattr(self.raw, "proc", None)
        if proc is not None:
            try:
                import psutil

                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            except Exception:
                pass
            proc.kill()

    def close(self) -> None:
        if not self.closed:
            if not getattr(self, "_aborted", False):
                try:
                    self.raw.close()
                except Exception:
                    pass
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


_MAGIC = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"\x28\xb5\x2f\xfd", None),
          (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


def decompressed(stream):
    """The tar bytes of a possibly compressed stream (detected by magic number: gzip, zstd, bzip2, xz)."""
    buffered = io.BufferedReader(stream if isinstance(stream, io.RawIOBase) else _Raw(stream), 1 << 20)
    head = buffered.peek(6)[:6]
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            if opener is None:
                import zstandard

                return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
            return opener(buffered)
    return buffered


def damage_errors() -> tuple:
    """Exceptions that mean the archive (or its compression) is broken, not the transport."""
    errors = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)
    try:
        import zstandard

        return errors + (zstandard.ZstdError,)
    except ImportError:
        return errors


class _Raw(io.RawIOBase):
    """A plain binary file object as a raw stream, so it can be buffered and peeked at."""

    def __init__(self, fileobj):
        super().__init__()
        self.fileobj = fileobj

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        data = self.fileobj.read(len(target))
        target[:len(data)] = data
        return len(data)
