"""Input layouts besides WebDataset tars, read into the same :class:`~pipeline.flow.read.RawSample` stream:

* ``files``: img2dataset's ``files`` output: ``{key}.jpg`` / ``.txt`` / ``.json`` in numbered subfolders
  (``00000/``, ``00001/``, ...), one subfolder a shard;
* ``parquet``: image bytes in a Parquet column: img2dataset's ``parquet`` output (``jpg`` bytes, ``txt``) and
  most Hugging Face image datasets (an ``image`` struct with ``bytes``, a ``text`` or ``caption`` column),
  one file a shard, streamed in row batches.

Every row or sample read becomes one output row, with the same status/error rules as a tar's.
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Iterator, NamedTuple, Optional

from pipeline.config import InputConfig
from pipeline.flow.read import RawSample, ShardReader, clean_key, expand_shards, listed, split_member

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes")  # first present wins
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
KEY_COLUMNS = ("key", "__key__", "uid", "id")
BATCH_ROWS = 256  # Parquet rows read at once (images are large)


def expand_inputs(patterns, input_format: str) -> list:
    """Shard URLs for ``input_format``: tars (webdataset), numbered subfolders (files) or Parquet files."""
    if input_format == "webdataset":
        try:
            return expand_shards(patterns)
        except ValueError as exc:
            raise ValueError(f"{exc}{_not_tars(patterns)}") from None
    from pipeline import storage

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    urls = []
    for pattern in patterns:
        for url in expand_shards([pattern]) if any(c in pattern for c in "{*?[") else [pattern]:
            urls.extend(_units(storage, url, input_format))
    if not urls:
        raise ValueError(f"no {input_format} inputs found in {patterns!r}")
    if input_format == "parquet":
        _check_first_parquet(urls[0])
    return list(dict.fromkeys(urls))


def _not_tars(patterns) -> str:
    """What to say when a tar pattern matched nothing: a folder holding no tars may be img2dataset's files or
    parquet output, read with ``--input-format``."""
    import os

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    folders = [p for p in patterns if "://" not in p and os.path.isdir(p)]
    if not folders:
        return ""
    return (f": {folders[0]} is a folder without .tar shards; img2dataset's other layouts are read with "
            f"--input-format files (numbered subfolders of {{key}}.jpg/.txt/.json) or --input-format parquet "
            f"(image bytes in Parquet files)")


def _check_first_parquet(url: str) -> None:
    """Refuse, before any work, image Parquet inputs whose first file's columns cannot be read
    (:func:`parquet_columns`); each file's reader checks its own file again (one footer read here, not one
    per file: a dataset's files share their schema)."""
    from pipeline.scores.table import file_schema

    try:
        schema = file_schema(url)
    except (OSError, ValueError):  # missing, unreadable or not Parquet: the run's checks and the reader say so
        return
    parquet_columns(url, schema)


def _units(storage, url: str, input_format: str) -> list:
    """A folder stands for its units (numbered subfolders / *.parquet files); anything else is one unit."""
    if not storage.is_dir(url):
        return [url]
    entries = storage.listdir(url)
    if input_format == "parquet":
        return [e for e in entries if e.endswith(".parquet") and not storage.basename(e).startswith((".", "_"))]
    entries = [e for e in entries if not storage.basename(e).startswith((".", "_"))]
    subfolders = [e for e in entries if storage.is_dir(e)]
    if subfolders:
        _warn_loose(url, [storage.basename(e) for e in entries if e not in subfolders],
                    [storage.basename(e) for e in subfolders])
    return subfolders or [url]


def _warn_loose(url: str, files: list, subfolders: list) -> None:
    """Warn about the files beside a folder's shard subfolders, which are not read; img2dataset's own
    (``00000.parquet`` and ``00000_stats.json`` beside ``00000/``) are expected there."""
    own = {f"{name}{suffix}" for name in subfolders for suffix in (".parquet", "_stats.json")}
    loose = [name for name in files if name not in own]
    if loose:
        shown = listed(loose)
        logging.getLogger("wclip").warning(
            "%s: %d file%s beside its shard subfolders not read (%s): only the files inside each subfolder are "
            "samples; move them into a subfolder of their own to score them", url, len(loose),
            "s" if len(loose) > 1 else "", shown)


def open_reader(url: str, inputs: InputConfig):
    """The sample reader of one shard in ``inputs.input_format``; each has ``damage`` after iterating."""
    if inputs.input_format == "files":
        return FolderReader(url, inputs.max_member_bytes)
    if inputs.input_format == "parquet":
        return ParquetReader(url, inputs.max_member_bytes)
    return ShardReader(url, max_member_bytes=inputs.max_member_bytes, stall_timeout=inputs.stall_timeout)


class FolderReader:
    """The samples of one img2dataset ``files`` folder: files grouped by key, in key order. Symbolic links
    are followed; what cannot be a member is said, never skipped without a word: a dangling link, a special
    file or files whose names differ only in case (``a.JPG``, ``a.jpg``) are their sample's ``skipped``
    members (its row's status ``read``), and folders inside the folder, which are not read, are named in
    :attr:`damage` (the shard's record)."""

    def __init__(self, url: str, max_member_bytes: int):
        self.url, self.max_member_bytes = url, max_member_bytes
        self.damage: Optional[str] = None

    def __iter__(self) -> Iterator[RawSample]:
        from pipeline import storage

        fs, root = storage.uncached(self.url)
        groups: dict = {}
        folders = []
        for entry in fs.ls(root, detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if name.startswith((".", "_")):
                continue
            kind, size = _file_kind(fs, entry)
            if kind == "folder":
                folders.append(name)
                continue
            key, ext = split_member(name)
            groups.setdefault(key, []).append(_File(name, entry["name"], ext, kind, size))
        if folders:
            self.damage = self._folders_note(sorted(folders))
        for index, key in enumerate(sorted(groups)):
            yield self._sample(fs, key, index, groups[key])

    def _folders_note(self, folders: list) -> str:
        shown = listed(folders)
        return (f"{len(folders)} folder{'s' if len(folders) > 1 else ''} inside this shard folder not read "
                f"({shown}): wclip reads the files directly in a shard folder; pass such a folder as its own --input")

    def _sample(self, fs, key: str, index: int, files: list) -> RawSample:
        shown, warning = clean_key(key)
        sample = RawSample(key=shown, index=index, warnings=[warning] if warning else [])
        by_ext: dict = {}
        for file in sorted(files, key=lambda f: f.name):
            by_ext.setdefault(file.ext, []).append(file)
        for ext, same in by_ext.items():
            if len(same) > 1:
                sample.skipped.append(f"member .{ext} not read: {len(same)} files give it "
                                      f"({', '.join(f.name for f in same)}: their names differ only in case); "
                                      f"rename or remove all but one")
            elif same[0].kind != "file":
                sample.skipped.append(f"member .{ext} ({same[0].name}) is {same[0].kind}: not read")
            elif same[0].size > self.max_member_bytes:
                sample.skipped.append(f"member .{ext} is {same[0].size} bytes, over the {self.max_member_bytes}-byte "
                                      f"limit (raise --max-member-bytes if such members are legitimate)")
            else:
                try:
                    sample.members[ext] = fs.cat_file(same[0].path)
                except OSError as exc:
                    sample.error = f"member .{ext} could not be read: {exc}"
        return sample


class _File(NamedTuple):
    name: str  # in the folder
    path: str  # for the filesystem
    ext: str
    kind: str  # "file", or what it is instead (a dangling link, a special file)
    size: int


def _file_kind(fs, entry: dict) -> tuple:
    """``(kind, size)`` of a folder entry of ``fs.ls(detail=True)``, symbolic links followed: kind is
    ``file``, ``folder``, or a phrase saying what else it is."""
    if entry.get("islink"):  # local files: ls describes the link itself, info follows it
        try:
            entry = fs.info(entry["name"])
        except OSError:
            return f"a dangling symbolic link (to {entry.get('destination')})", 0
    kind = entry.get("type")
    if kind == "directory":
        return "folder", 0
    if kind == "file":
        return "file", int(entry.get("size") or 0)
    return "not a regular file (a fifo, socket or device)", 0


class ParquetReader:
    """The rows of one Parquet file of images: each row a sample whose members are the image bytes
    (``jpg``), the caption (``txt``) and the other scalar columns as metadata (``json``)."""

    def __init__(self, url: str, max_member_bytes: int):
        self.url, self.max_member_bytes = url, max_member_bytes
        self.damage: Optional[str] = None

    def __iter__(self) -> Iterator[RawSample]:
        from pipeline.scores.table import parquet_file

        with parquet_file(self.url) as pf:
            image, caption, key = parquet_columns(self.url, pf.schema_arrow)
            index = 0
            try:
                for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                    for row in batch.to_pylist():
                        yield self._sample(row, index, image, caption, key)
                        index += 1
            except OSError as exc:  # a truncated or corrupt file after some row groups: damage, rows kept
                self.damage = f"parquet damaged after {index} rows: {exc}"

    def _sample(self, row: dict, index: int, image: str, caption: Optional[str], key: Optional[str]) -> RawSample:
        name = str(row[key]) if key and row.get(key) is not None else f"{index:09d}"
        sample = RawSample(key=clean_key(name)[0], index=index)
        data = row.get(image)
        if isinstance(data, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
            data = data.get("bytes")
        if isinstance(data, (bytes, bytearray)) and data:
            self._member(sample, "jpg", image, bytes(data), "images")
        text = row.get(caption) if caption else None
        if text is not None:  # str or bytes: parquet_columns refused any other type
            self._member(sample, "txt", caption, text.encode("utf-8") if isinstance(text, str) else bytes(text),
                         "captions")
        meta = {k: v for k, v in row.items() if k not in (image, caption) and _scalar(v)}
        sample.members["json"] = json.dumps(meta, default=str).encode()
        return sample

    def _member(self, sample: RawSample, ext: str, column: str, data: bytes, what: str) -> None:
        if len(data) > self.max_member_bytes:
            sample.skipped.append(f"column {column} is {len(data)} bytes, over the {self.max_member_bytes}-byte "
                                  f"limit (raise --max-member-bytes if such {what} are legitimate)")
        else:
            sample.members[ext] = data


def parquet_columns(url: str, schema) -> tuple:
    """``(image, caption, key)``: the columns of an image Parquet file (``schema``) that hold the image,
    the caption (None: no caption column) and the key (None: keys are row numbers), the first present of
    each list. Raises ValueError, in one line, for a file without an image column or whose caption column
    does not hold text (a number or a list is not a caption; strings and bytes are, bytes decoded as UTF-8)."""
    names = schema.names
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    caption = next((c for c in CAPTION_COLUMNS if c in names), None)
    key = next((c for c in KEY_COLUMNS if c in names), None)
    if image is None:
        raise ValueError(f"{url}: no image column (looked for {', '.join(IMAGE_COLUMNS)}; "
                         f"the file has {', '.join(names)})")
    if caption is not None and not _is_text(schema.field(caption).type):
        raise ValueError(f"{url}: the caption column {caption!r} holds {schema.field(caption).type}, not text "
                         f"(string, or binary holding UTF-8); the caption is the first of "
                         f"{', '.join(CAPTION_COLUMNS)} present: rename that column or store the captions as strings")
    return image, caption, key


def _is_text(kind) -> bool:
    """A Parquet column type that can hold captions: strings, bytes, a dictionary of either, or only nulls."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        return _is_text(kind.value_type)
    return any(check(kind) for check in (
        pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_binary,
        pa.types.is_large_binary, pa.types.is_binary_view, pa.types.is_fixed_size_binary, pa.types.is_null))


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
