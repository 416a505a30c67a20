"""DataComp uid lists: 128-bit hex uids as a sorted ``np.dtype("u8,u8")`` array in a ``.npy`` file.

The format DataComp's resharder reads: ``f0`` holds the first 16 hex digits, ``f1`` the last 16.
:class:`UidCollector` gathers uids in bounded memory (sorted runs spilled to a local folder, then a
block-wise merge streamed into the output file, which may be a URL).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.storage import open_atomic

UID_DTYPE = np.dtype("u8,u8")
RUN_ROWS = 1 << 20   # uids sorted in memory at once: 16 MiB, ~3.5x that while sorted (a 1e8-row filter peaked
                     # at 1476 MB with 1 << 24 and mapped runs, 539 MB with 1 << 22: docs/benchmarks.md "Cost curves")
MIN_BLOCK = 4096     # fewest uids read from one sorted run per merge step
_HEX = np.full(256, 255, dtype=np.uint64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def uid_to_int(uid: np.void) -> int:
    """The 128-bit integer of one ``u8,u8`` record."""
    return (int(uid[0]) << 64) | int(uid[1])


def parse_uids(column) -> tuple[np.ndarray, int, int]:
    """``(uids, malformed, missing)`` for an Arrow string column of hex uids.

    ``uids`` holds the well-formed ones (exactly 32 hex digits) in ``UID_DTYPE``, in input order.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    missing = column.null_count
    good_mask = pc.fill_null(pc.match_substring_regex(column, r"^[0-9a-fA-F]{32}$"), False)
    good = column.filter(good_mask)
    malformed = len(column) - missing - len(good)
    out = np.empty(len(good), dtype=UID_DTYPE)
    if len(good):
        binary = pa.large_binary() if pa.types.is_large_string(good.type) else pa.binary()
        fixed = good.cast(binary).cast(pa.binary(32))
        raw = np.frombuffer(fixed.buffers()[1], dtype=np.uint8)
        digits = _HEX[raw[fixed.offset * 32: (fixed.offset + len(fixed)) * 32].reshape(-1, 32)]
        for field, cols in (("f0", digits[:, :16]), ("f1", digits[:, 16:])):
            value = np.zeros(len(good), dtype=np.uint64)
            for j in range(16):
                value = (value << np.uint64(4)) | cols[:, j]
            out[field] = value
    return out, malformed, missing


def sort_uids(uids: np.ndarray) -> np.ndarray:
    """Sorted copy, ordered by ``(f0, f1)``."""
    return uids[np.lexsort((uids["f1"], uids["f0"]))]


class UidCollector:
    """Collect uid arrays and write them sorted to one ``.npy``; memory stays near ``run_rows``."""

    def __init__(self, run_rows: int = RUN_ROWS, spill_parent=None, min_block: int = MIN_BLOCK):
        self.run_rows = run_rows
        self.min_block = min_block
        self.spill_parent = spill_parent   # where sorted runs go (default: the system temp folder)
        self.count = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._runs: list[Path] = []
        self._spill_dir: str | None = None

    def add(self, uids: np.ndarray) -> None:
        self._buffer.append(uids)
        self._buffered += len(uids)
        self.count += len(uids)
        if self._buffered >= self.run_rows:
            self._spill()

    def _take_buffer(self) -> np.ndarray:
        arr = np.concatenate(self._buffer) if self._buffer else np.empty(0, UID_DTYPE)
        self._buffer, self._buffered = [], 0
        return sort_uids(arr)

    def _spill(self) -> None:
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix=".wclip-uids-", dir=self.spill_parent)
        path = Path(self._spill_dir) / f"run-{len(self._runs):05d}.u8u8"
        self._take_buffer().tofile(path)   # raw records: the merge reads them back in blocks
        self._runs.append(path)

    def write(self, path) -> int:
        """Write the sorted uids to ``path`` (local or URL) crash-safe; returns how many."""
        try:
            with open_atomic(path) as fh:
                if not self._runs:
                    np.save(fh, self._take_buffer())
                else:
                    if self._buffered:
                        self._spill()
                    self._merge(fh)
        finally:
            if self._spill_dir:
                shutil.rmtree(self._spill_dir, ignore_errors=True)
                self._spill_dir, self._runs = None, []
        return self.count

    def _merge(self, fh) -> None:
        """Merge the sorted runs into ``fh`` as one ``.npy`` array, block by block, in order. About
        ``run_rows`` uids are held at once (``min_block`` from each run when there are more runs than
        ``run_rows / min_block``); blocks are read, not memory-mapped, since mapped pages count as this
        process's memory until the whole run is unmapped."""
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(UID_DTYPE),
                                                  "fortran_order": False, "shape": (self.count,)})
        lengths = [p.stat().st_size // UID_DTYPE.itemsize for p in self._runs]
        block = max(self.min_block, self.run_rows // len(self._runs))
        pos, written = [0] * len(self._runs), 0
        while written < self.count:
            live = [i for i, n in enumerate(lengths) if pos[i] < n]
            blocks = {i: read_run(self._runs[i], pos[i], block) for i in live}
            # every uid <= the smallest last-of-block among runs not exhausted is safe to emit
            partial = [blocks[i][-1] for i in live if pos[i] + len(blocks[i]) < lengths[i]]
            bound = min(partial, key=lambda u: (int(u[0]), int(u[1]))) if partial else None
            parts = []
            for i in live:
                take = len(blocks[i]) if bound is None else int(
                    np.searchsorted(blocks[i], np.array(bound, dtype=UID_DTYPE), side="right"))
                parts.append(blocks[i][:take])
                pos[i] += take
            merged = sort_uids(np.concatenate(parts))
            del blocks, parts
            fh.write(memoryview(np.ascontiguousarray(merged)).cast("B"))
            written += len(merged)


def read_run(path, start: int, count: int) -> np.ndarray:
    """Up to ``count`` uids of a spilled run file, from position ``start``."""
    with open(path, "rb") as fh:
        fh.seek(start * UID_DTYPE.itemsize)
        return np.fromfile(fh, dtype=UID_DTYPE, count=count)
