"""Precomputed embeddings in: clip-retrieval / LAION folders and DataComp ``.npz`` shards, found, described
and read in bounded blocks of rows (local paths or any fsspec URL).

clip-retrieval's ``clip-retrieval inference`` (and LAION's released embeddings) write one folder with three
row-aligned parts per batch ``N``::

    img_emb/img_emb_N.npy   text_emb/text_emb_N.npy   metadata/metadata_N.parquet (image_path or key, caption, url...)

DataComp ships ``{shard}.npz`` (arrays ``l14_img``, ``l14_txt``, ``b32_img``, ``b32_txt``) beside
``{shard}.parquet`` (``uid``, ``url``, ``text``). Each such set of row-aligned files is one
:class:`EmbeddingFile`: the unit of work and of output (``metadata_N`` / ``{shard}``).

Embeddings ``wclip score --save-embeddings`` saved (a clip-retrieval folder with wclip's ``wclip.json``,
:data:`pipeline.scores.layout.SAVED_STAMP`) go round trip: each batch is named like the shard it came from
(``00042``, as its scores are), its rows name that shard in the scores' ``shard`` column (the metadata's
``shard``), and the stamp's model is the one that made them (:attr:`EmbeddingSource.saved_model`).
"""

from __future__ import annotations

import contextlib
import re
import zipfile
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.scores.layout import SAVED_STAMP, embedding_number

CLIP_RETRIEVAL, DATACOMP = "clip-retrieval", "datacomp"
CLIP_FOLDERS = {"image": ("img_emb", "img_emb_"), "text": ("text_emb", "text_emb_")}  # folder, file prefix
DATACOMP_SUFFIX = {"image": "img", "text": "txt"}  # {key}_{suffix} arrays in a DataComp .npz
METADATA_COLUMNS = {  # output column -> source columns, first present wins
    CLIP_RETRIEVAL: {"key": ("key", "image_path"), "url": ("url",), "caption": ("caption",), "uid": ("uid",)},
    DATACOMP: {"key": ("uid",), "url": ("url",), "caption": ("text", "caption"), "uid": ("uid",)},
}
_METADATA_NAME = re.compile(r"^metadata_(.+)\.parquet$")
_FLOATS = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class EmbeddingFile:
    """One set of row-aligned files: the metadata and each tower's embeddings."""

    name: str  # output name: ``metadata_N`` (clip-retrieval) or the DataComp shard name
    url: str  # the input named in the scores' ``shard`` column: the metadata Parquet / the .npz
    metadata: str  # Parquet with the keys (and url, caption, uid)
    towers: tuple  # ((tower, url, member), ...): a .npy file (member "") or an array of a .npz
    saved_by: Optional[tuple] = None  # (model, weights): saved by `wclip score --save-embeddings` with that model


@dataclass(frozen=True)
class EmbeddingSource:
    """What a job reads: one kind of embeddings, as files."""

    kind: str  # CLIP_RETRIEVAL or DATACOMP
    key: Optional[str]  # DataComp's array prefix ("l14", "b32"); None for clip-retrieval
    files: tuple  # EmbeddingFile, in input order

    @property
    def label(self) -> str:
        return self.kind if self.key is None else f"{self.kind}-{self.key}"

    def identity(self) -> dict:
        """Stands for the model identity of tar jobs: what made these vectors."""
        return {"model": f"embeddings:{self.label}", "weights": "precomputed"}

    @property
    def towers(self) -> tuple:
        """The towers any file has (a clip-retrieval batch without metadata may have fewer)."""
        return tuple(dict.fromkeys(t for f in self.files for t, _, _ in f.towers))

    @property
    def saved_model(self) -> Optional[dict]:
        """The model identity that made every file, when wclip saved them all with one model; else None."""
        made = {f.saved_by for f in self.files}
        if len(made) != 1 or None in made:
            return None
        model, weights = made.pop()
        return {"model": model, "weights": weights}


# -- finding the files --------------------------------------------------------------------------------
def discover(paths, key: Optional[str] = None) -> EmbeddingSource:
    """The embedding files under ``paths``: clip-retrieval folders, DataComp ``.npz`` URLs / brace patterns
    / globs, or folders of ``.npz`` shards. Raises ConfigError naming what is wrong."""
    from braceexpand import braceexpand

    from pipeline.flow.read import expand_shards

    kinds, files = set(), []
    for path in paths:
        for pattern in braceexpand(path):
            for item in expand_shards([pattern]) if _is_glob(pattern) else [pattern]:
                kind, found = _files_at(item.rstrip("/"), key)
                kinds.add(kind)
                files.extend(found)
    if len(kinds) > 1:
        raise ConfigError("--embeddings mixes clip-retrieval folders and DataComp .npz shards; "
                          "fit and score each kind on its own")
    kind = kinds.pop()
    if kind == DATACOMP and key is None:
        raise ConfigError("DataComp shards hold two models' arrays: pass --embedding-key l14 or --embedding-key b32")
    if kind == CLIP_RETRIEVAL and key is not None:
        raise ConfigError("--embedding-key picks a DataComp .npz's arrays; clip-retrieval folders have one model")
    seen: dict = {}
    for f in files:
        if f.name in seen:
            raise ConfigError(f"two embedding files share the output name {f.name!r}: {seen[f.name]} and {f.url}; "
                              f"score them into different --output folders")
        seen[f.name] = f.url
    if not files:
        raise ConfigError(f"no embedding files found in {', '.join(paths)}")
    return EmbeddingSource(kind=kind, key=key, files=tuple(files))


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _files_at(path: str, key: Optional[str]) -> tuple:
    if path.endswith(".npz"):
        return DATACOMP, [_datacomp_file(path, key)]
    if storage.is_dir(storage.join(path, "metadata")):
        return CLIP_RETRIEVAL, _clip_retrieval_files(path)
    npz = storage.list_files(path, ".npz")
    if npz:
        return DATACOMP, [_datacomp_file(u, key) for u in npz]
    raise ConfigError(f"--embeddings {path}: neither a clip-retrieval folder (img_emb/, text_emb/, metadata/) nor "
                      f"DataComp .npz shards (or a folder of them)")


def _datacomp_file(url: str, key: Optional[str]) -> EmbeddingFile:
    name = storage.basename(url)[: -len(".npz")]
    towers = tuple((t, url, f"{key}_{s}") for t, s in DATACOMP_SUFFIX.items())
    return EmbeddingFile(name=name, url=url, metadata=url[: -len(".npz")] + ".parquet", towers=towers)


def _clip_retrieval_files(folder: str) -> list:
    """One :class:`EmbeddingFile` per batch ``N`` that has a ``metadata_N.parquet`` or any ``*_emb_N.npy``, so
    that no embeddings file goes unread: a batch whose metadata is missing is kept, and fails in its task
    (:func:`read_metadata`: a recorded failure, exit 1), as a DataComp ``.npz`` without its ``.parquet`` does.
    Refused here (ConfigError): metadata without a tower's ``.npy``, and ``.npy`` files not named
    ``img_emb_N.npy`` / ``text_emb_N.npy``, whose rows no metadata can name."""
    present, stray = {}, []
    for tower, (sub, prefix) in CLIP_FOLDERS.items():
        numbers = set()
        for url in storage.list_files(storage.join(folder, sub), ".npy"):
            name = storage.basename(url)
            if name.startswith(prefix) and len(name) > len(prefix) + len(".npy"):
                numbers.add(name[len(prefix): -len(".npy")])
            else:
                stray.append(f"{sub}/{name}")
        if numbers:
            present[tower] = (sub, prefix, numbers)
    if stray:
        raise ConfigError(f"--embeddings {folder}: {_some(stray)} not named like clip-retrieval's "
                          f"img_emb/img_emb_N.npy or text_emb/text_emb_N.npy, so no metadata_N.parquet names "
                          f"{'their' if len(stray) > 1 else 'its'} rows: move {'them' if len(stray) > 1 else 'it'} "
                          f"out of the folder")
    if not present:
        raise ConfigError(f"--embeddings {folder}: no img_emb/*.npy or text_emb/*.npy beside metadata/")
    saved = _saved_by(folder)
    metadata = {}
    for meta in storage.list_files(storage.join(folder, "metadata"), ".parquet"):
        match = _METADATA_NAME.match(storage.basename(meta))
        if match:
            metadata[match.group(1)] = meta
    for n in metadata:
        missing = [f"{sub}/{prefix}{n}.npy" for sub, prefix, numbers in present.values() if n not in numbers]
        if missing:
            raise ConfigError(f"--embeddings {folder}: metadata/metadata_{n}.parquet has no {', '.join(missing)}; "
                              f"the folder is incomplete")
    files = []
    for n in _batch_order(metadata, present):
        meta = metadata.get(n, storage.join(folder, "metadata", f"metadata_{n}.parquet"))
        towers = tuple((tower, storage.join(folder, sub, f"{prefix}{n}.npy"), "")
                       for tower, (sub, prefix, numbers) in present.items() if n in numbers)
        name = _shard_of(n, metadata.get(n)) if saved else f"metadata_{n}"
        files.append(EmbeddingFile(name=name, url=meta, metadata=meta, towers=towers, saved_by=saved))
    return files


def _saved_by(folder: str) -> Optional[tuple]:
    """``(model, weights)`` of the run that saved the clip-retrieval folder ``folder`` (its ``wclip.json``), or
    None: not saved by wclip (or not readable as saved by it)."""
    path = storage.join(folder, SAVED_STAMP)
    if not storage.exists(path):
        return None
    try:
        made = storage.read_json(path).get("model") or {}
    except (ValueError, OSError, AttributeError):
        return None
    return (made["model"], made["weights"]) if made.get("model") and made.get("weights") else None


def _shard_of(n: str, metadata: Optional[str]) -> str:
    """The name of the shard whose embeddings wclip saved as batch ``n``: ``n`` itself when the shard's name is a
    number; else the name, read from the ``shard`` column of the batch's metadata, whose hash ``n`` is."""
    if len(n) != 20 or metadata is None:
        return n
    from pipeline.flow.read import shard_name
    from pipeline.scores.table import read_columns

    try:
        shards = read_columns(metadata, ["shard"], use_threads=False).column("shard")
    except (ValueError, OSError, KeyError):
        return n
    name = shard_name(shards[0].as_py() or "") if len(shards) else ""
    return name if name and embedding_number(name) == n else n


def _batch_order(metadata: dict, present: dict) -> list:
    """The batch numbers: those with metadata in listing order, then those with embeddings only, sorted."""
    orphans = set().union(*(numbers for _, _, numbers in present.values())) - set(metadata)
    return list(metadata) + sorted(orphans, key=lambda n: (len(n), n))


def _some(names: list, shown: int = 3) -> str:
    """A few names of a list, and how many more."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


# -- reading ----------------------------------------------------------------------------------------------
class ArrayReader:
    """Rows of a 2-D ``.npy`` stream (a file, or a member of a ``.npz``), read in blocks as they are stored."""

    def __init__(self, fh, where: str):
        self.fh, self.where = fh, where
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if len(shape) != 2 or fortran or dtype.type not in _FLOATS:
            raise ValueError(f"{where}: expected a 2-D C-ordered float array, got shape {shape} {dtype}"
                             + (" (Fortran order)" if fortran else ""))
        self.rows, self.dim, self.dtype = int(shape[0]), int(shape[1]), dtype
        self.done = 0
        self._buffer = None

    def read(self, rows: int, reuse: bool = False) -> np.ndarray:
        """The next ``rows`` rows (fewer at the end), in the stored dtype; ``reuse``: in one buffer kept by the
        reader (the rows are valid until the next read)."""
        rows = min(rows, self.rows - self.done)
        want = rows * self.dim * self.dtype.itemsize
        if not reuse:
            buf = np.empty(want, dtype=np.uint8)  # not zero-filled (a bytearray is, holding the GIL)
        else:
            if self._buffer is None or self._buffer.size < want:
                self._buffer = np.empty(want, dtype=np.uint8)
            buf = self._buffer[:want]
        view, got = memoryview(buf), 0
        while got < want:
            n = self.fh.readinto(view[got:])
            if not n:
                read = self.done + got // (self.dim * self.dtype.itemsize)
                raise ValueError(f"{self.where}: the file ends after {read} of {self.rows} rows (truncated)")
            got += n
        self.done += rows
        return buf.view(self.dtype).reshape(rows, self.dim)


_HALF_TO_SINGLE = np.float32(2.0 ** 112)  # 2^(127 - 15): float16's exponent bias to float32's
_SIGN_AND_LOW_28_BITS = np.int32(-0x70000001)  # 0x8FFFFFFF


def as_float32(block: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """A float32 copy of a block of rows, the values exactly as ``block.astype(np.float32)``. Float16 (how
    clip-retrieval and DataComp store embeddings) goes through integer operations: NumPy's own cast is a
    scalar loop (1.4 ns per value here), 4x the time of these vectorised passes on a 4096 x 64 block (in the
    cache). Each float16, sign-extended to 32 bits and shifted left by 13, has its exponent and mantissa where
    a float32 has them; clearing bits 28-30 leaves the sign in bit 31, and scaling by 2^112 rebiases the
    exponent, which gives every finite value, subnormals included. Infinities and NaNs come out of it as
    magnitudes of 2^16 or more, which no finite float16 reaches (65504 at most): only a block with such a
    value is searched for them. ``out``: a C-contiguous float32 array of the block's shape to write into."""
    single = np.empty(block.shape, dtype=np.float32) if out is None else out
    if block.dtype != np.float16:
        np.copyto(single, block, casting="same_kind")
        return single
    bits = single.view(np.int32)
    np.copyto(bits, block.view(np.int16))  # sign-extended
    bits <<= 13
    bits &= _SIGN_AND_LOW_28_BITS
    single *= _HALF_TO_SINGLE
    if single.size and (single.max() >= 65536.0 or single.min() <= -65536.0):  # finite halves stay below
        half = block.view(np.uint16)
        special = (half & 0x7C00) == 0x7C00  # exponent all ones
        specials = half[special]
        single[special] = np.where(specials & 0x3FF, np.nan, np.where(specials & 0x8000, -np.inf, np.inf))
    return single


@contextlib.contextmanager
def open_array(url: str, member: str = "") -> Iterator[ArrayReader]:
    """An :class:`ArrayReader` on a ``.npy`` file, or on array ``member`` of a ``.npz``."""
    with storage.open_read(url) as fh:
        if not member:
            yield ArrayReader(fh, array_name(url))
            return
        with zipfile.ZipFile(fh) as zf:
            if member + ".npy" not in zf.namelist():
                raise ValueError(f"{storage.basename(url)} has no array {member!r} "
                                 f"(it has {', '.join(n[:-4] for n in zf.namelist())})")
            with zf.open(member + ".npy") as inner:
                yield ArrayReader(inner, array_name(url, member))


def array_name(url: str, member: str = "") -> str:
    """How errors name an array: the ``.npy`` file's name, or ``shard.npz:member``."""
    return f"{storage.basename(url)}:{member}" if member else storage.basename(url)


def read_blocks(file: EmbeddingFile, total: int, block_rows: int, rows: Optional[int] = None,
                reuse: bool = False, widths: Optional[dict] = None) -> Iterator[tuple]:
    """``(start, {tower: block})`` over the first ``rows`` rows (default: all) of every tower of ``file``, in
    lockstep; a tower whose row count is not ``total`` (the metadata's) is an error, and so is one whose width
    is not ``widths[tower]``, ``(width, whose)``: the error says "``whose`` ``width``-d ones" ("the stats
    were fitted on 64-d ones"). ``reuse``: each tower's blocks share one buffer, valid until the next block
    (see :func:`pipeline.sources.vector_tasks.score_file`)."""
    rows = total if rows is None else rows
    with contextlib.ExitStack() as stack:
        readers = {t: stack.enter_context(open_array(url, member)) for t, url, member in file.towers}
        for tower, reader in readers.items():
            if reader.rows != total:
                raise ValueError(f"{reader.where} has {reader.rows} rows but {storage.basename(file.metadata)} has "
                                 f"{total}: the files are not row-aligned")
            width, whose = (widths or {}).get(tower, (reader.dim, ""))
            if reader.dim != width:
                raise ValueError(f"{reader.where} holds {reader.dim}-d {tower} embeddings, but {whose} {width}-d "
                                 f"ones: a file of another model among the inputs")
        for start in range(0, rows, block_rows):
            yield start, {t: r.read(min(block_rows, rows - start), reuse) for t, r in readers.items()}


def read_metadata(file: EmbeddingFile, kind: str) -> pa.Table:
    """The file's rows as a table of string columns ``key``, ``url``, ``caption``, ``uid`` (null where absent),
    and ``shard`` (the input each row was read from) for embeddings wclip saved."""
    from pipeline.scores.table import file_schema, read_columns

    if not storage.exists(file.metadata):
        arrays = list(dict.fromkeys(storage.basename(url) for _, url, _ in file.towers))
        raise ValueError(f"{file.metadata} does not exist: {' and '.join(arrays)} "
                         f"{'have' if len(arrays) > 1 else 'has'} no metadata (keys) beside "
                         f"{'them' if len(arrays) > 1 else 'it'}")
    wanted = METADATA_COLUMNS[kind]
    if file.saved_by is not None:
        wanted = {**wanted, "shard": ("shard",)}
    names = file_schema(file.metadata).names
    source = {out: next((c for c in cols if c in names), None) for out, cols in wanted.items()}
    if source["key"] is None:
        raise ValueError(f"{file.metadata} has no key column ({' or '.join(wanted['key'])}); it has {', '.join(names)}")
    # one file is one task: its columns decode on the task's own thread (files are the parallelism)
    table = read_columns(file.metadata, sorted({c for c in source.values() if c}), use_threads=False)
    n = table.num_rows
    columns = {out: (pc.cast(table.column(src), pa.string()) if src else pa.nulls(n, pa.string()))
               for out, src in source.items()}
    return pa.table(columns)


def probe(file: EmbeddingFile, rows: int = 1024) -> dict:
    """``{tower: {"dim", "dtype", "rows", "normalized"}}`` from each tower's header and first ``rows`` rows."""
    out = {}
    for tower, url, member in file.towers:
        with open_array(url, member) as reader:
            sample = reader.read(rows).astype(np.float64)
        out[tower] = {"dim": reader.dim, "dtype": str(reader.dtype), "rows": reader.rows,
                      "normalized": is_normalized(sample)}
    return out


NORM_TOLERANCE = 1e-2  # |norm - 1| of an L2-normalised row stored in float16 stays well below this
NORM_STATE = {True: "L2-normalised", False: "raw"}  # how messages name is_normalized's answer


def unit_norms(lo: float, hi: float) -> bool:
    """Whether rows whose L2 norms lie in ``[lo, hi]`` are L2-normalised (both ends within
    :data:`NORM_TOLERANCE` of 1): the one rule the probe, the fit and every scored file apply."""
    return abs(lo - 1.0) <= NORM_TOLERANCE and abs(hi - 1.0) <= NORM_TOLERANCE


def is_normalized(rows: np.ndarray) -> Optional[bool]:
    """True when every finite row has unit L2 norm (None: no finite row to tell)."""
    rows = rows[np.isfinite(rows).all(axis=1)]
    if not len(rows):
        return None
    norms = np.linalg.norm(rows, axis=1)
    return unit_norms(float(norms.min()), float(norms.max()))
