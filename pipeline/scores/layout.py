"""The scores folder's layout, defined once: where each file wclip keeps lives, reading the completion markers
back, and the completeness check every reader of a folder runs first.

The scores folder holds only score Parquet files (``<shard>.parquet``), so pandas, pyarrow, duckdb, polars and
Hugging Face ``datasets`` read it as it is, as exactly the score rows. Everything else wclip keeps lives beside
it, in the sibling folder ``DIR.wclip/`` (:func:`state_folder`; duckdb and polars read hidden subfolders too,
so nothing of wclip's may sit inside ``DIR``)::

    DIR/<shard>.parquet                   the scores, with what made them in the file's metadata
    DIR.wclip/run.json                    what made the folder: stats digest, model, normalisation
    DIR.wclip/lock                        held by the run writing the folder (pipeline.scores.folder.claim_folder)
    DIR.wclip/shards/<shard>.json         completion marker, written last: counts, timing, provenance
    DIR.wclip/failures.jsonl              shards that failed every attempt
    DIR.wclip/embeddings/                 --save-embeddings, in clip-retrieval's layout:
        img_emb/img_emb_<N>.npy  text_emb/text_emb_<N>.npy  metadata/metadata_<N>.parquet
        wclip.json                        what made them (model identity, normalisation): SAVED_STAMP

A folder at the root of a file system or bucket has no sibling and is refused. A folder of wclip 0.1 kept its
bookkeeping inside, in ``DIR/.wclip/``: the first command that meets such a folder moves it to ``DIR.wclip/``
once (:func:`adopt_legacy_state`, an INFO line says so); it refuses a folder holding both.

A shard is done when its marker exists, was made by the same stats and model, and its Parquet file is
there with the size the marker recorded (with ``--save-embeddings``: and its embeddings were saved).

The embeddings folder is what ``clip-retrieval inference`` writes, so ``clip-retrieval index`` and autofaiss
read it as it is (``--embeddings_folder DIR.wclip/embeddings``), and so does ``wclip fit/score --embeddings``,
which knows it by its ``wclip.json``: it scores it with the model recorded there and names each output like
the shard it came from (:mod:`pipeline.sources.vectors`). Per shard, ``N`` is the shard's name when it is a
number (``00042.tar`` -> ``img_emb_00042.npy``), else a 20-digit number from a hash of the name; either way it
depends on the shard alone, so a resumed or extended run never renumbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath

from pipeline import storage
from pipeline.errors import ConfigError

STATE_SUFFIX = ".wclip"  # DIR's bookkeeping: the sibling folder DIR.wclip/
LAYOUT = "DIR.wclip"  # run.json's "layout"
LEGACY_STATE = ".wclip"  # wclip 0.1 kept it inside: DIR/.wclip/ (moved by adopt_legacy_state)
STATE_NAMES = frozenset({"run.json", "lock", "shards", "failures.jsonl", "embeddings", "dedup.json", "work"})
SCORES_SUFFIX = ".parquet"

log = logging.getLogger("wclip")


def state_folder(output) -> str:
    """``DIR.wclip``: where wclip keeps the bookkeeping of folder ``output`` (a local path or URL), beside it.
    A folder at the root of its file system or bucket has no such sibling: refused (ConfigError)."""
    text = str(output)
    if not storage.is_url(text):
        path = os.path.normpath(text)
        if os.path.basename(path) in ("", ".", ".."):
            path = os.path.abspath(path)
        if os.path.dirname(path) != path:
            return path + STATE_SUFFIX
    else:
        inside = storage.filesystem(text)[1].rstrip("/")
        if "/" in inside and posixpath.basename(inside) not in (".", ".."):
            return text.rstrip("/") + STATE_SUFFIX
    example = (text if text.endswith("/") else text + "/") + "scores"
    raise ConfigError(f"{output} is the root of its file system or bucket: wclip keeps a folder's bookkeeping "
                      f"beside it (DIR{STATE_SUFFIX}), so give a folder inside it, e.g. {example}")


def state_path(output: str, *names: str) -> str:
    return storage.join(state_folder(output), *names)


def adopt_legacy_state(output) -> None:
    """Move the bookkeeping wclip 0.1 kept inside the folder (``DIR/.wclip/``) to ``DIR.wclip/``, once, with an
    INFO line; called by every command that meets a folder before it reads its markers. A ``.wclip/`` holding
    anything wclip never kept there is not wclip's: left as it is. Refused (ConfigError): a folder with both,
    and one an older wclip is writing (its lock held)."""
    old = storage.join(output, LEGACY_STATE)
    if not storage.is_dir(old):
        return
    names = {storage.basename(p) for p in storage.listdir(old)}
    if any(n not in STATE_NAMES and not storage.is_temporary(n) for n in names):
        return
    new = state_folder(output)
    if storage.exists(new) and storage.is_dir(old):  # (not when a run starting beside this one just moved it)
        raise ConfigError(f"{output} has wclip's bookkeeping twice: in {old} (wclip 0.1's layout) and in {new}; a "
                          f"folder never mixes two records: remove the one of the run you do not want")
    lock = storage.local_file(storage.join(old, "lock")) if "lock" in names else None
    try:
        with storage.exclusive(lock, {"command": "move"}) if lock else contextlib.nullcontext():
            fs, path = storage.filesystem(old)
            fs.mv(path, storage.filesystem(new)[1], recursive=True)
    except FileNotFoundError:
        if storage.exists(new) and not storage.is_dir(old):
            return  # a run starting beside this one moved it first
        raise
    except storage.Held:
        raise ConfigError(f"{output} is being written by an older wclip (it holds {lock}): let it end, then rerun "
                          f"this command") from None
    log.info("moved wclip's bookkeeping of %s from %s to %s (the folder now holds only score files)", output, old,
             new)


def marker_path(output: str, name: str) -> str:
    return state_path(output, "shards", name + ".json")


def scores_path(output: str, name: str) -> str:
    return storage.join(output, name + SCORES_SUFFIX)


def file_sizes(folder: str, suffix: str = "") -> dict:
    """``{file name: size in bytes}`` of the files directly in ``folder`` (empty when it does not exist)."""
    fs, p = storage.uncached(folder)
    if not fs.exists(p):
        return {}
    return {storage.basename(e["name"]): int(e.get("size") or 0) for e in fs.ls(p, detail=True)
            if storage.is_file_entry(fs, e) and storage.basename(e["name"]).endswith(suffix)}


def markers(output: str, project=None) -> dict:
    """``{shard name: marker}`` of the completed shards under ``output``; ``project(marker)``, when given,
    stands for each marker as it is read (a parsed marker takes ~3.6 KB: keep only what is needed)."""
    folder = state_path(output, "shards")
    out = {}
    for name in sorted(file_sizes(folder, ".json")):
        if name.startswith("."):
            continue
        try:
            marker = json.loads(storage.read_bytes(storage.join(folder, name)))
        except (ValueError, OSError):
            continue  # an unreadable marker counts as no marker: the shard is redone
        out[name[: -len(".json")]] = project(marker) if project else marker
    return out


def incomplete_shards(directory) -> list:
    """``[(shard name, what is wrong)]`` of the shards whose completion marker is in ``directory`` but whose
    score file is missing or has another size than the marker recorded (a folder without markers, scores of
    another tool, has none)."""
    sizes = file_sizes(directory, SCORES_SUFFIX)
    recorded = markers(directory, lambda m: (m.get("parquet") or {}).get("bytes"))
    wrong = []
    for name, size in recorded.items():
        found = sizes.get(name + SCORES_SUFFIX)
        if found is None:
            wrong.append((name, "missing"))
        elif size is not None and found != size:
            wrong.append((name, f"{found} bytes, {size} recorded"))
    return wrong


def check_complete(directory) -> None:
    """Refuse a scores folder that lost score files it recorded as done (or holds them changed), naming them."""
    wrong = incomplete_shards(directory)
    if wrong:
        shown = "; ".join(f"{name}{SCORES_SUFFIX} {what}" for name, what in wrong[:3])
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ConfigError(f"the scores folder {directory} is incomplete: {len(wrong)} shard(s) recorded as scored "
                          f"have no score file or one of another size ({shown}{more}); rerun the `wclip score` "
                          f"command that wrote the folder to rescore them")


def list_score_files(directory) -> list[str]:
    """The finished score files in ``directory`` (a local folder or URL), sorted by name (temporary files
    skipped), after refusing a folder that lost files its markers record (:func:`check_complete`)."""
    if not storage.is_dir(directory):
        raise FileNotFoundError(f"scores directory {str(directory)!r} does not exist")
    adopt_legacy_state(directory)
    check_complete(directory)
    return [f for f in storage.list_files(directory, ".parquet")
            if not storage.basename(f).startswith(".") and not f.endswith(".tmp")]


LOCK = "lock"  # DIR.wclip/lock: held by the run writing the folder (local folders)


def failures_path(output: str) -> str:
    return state_path(output, "failures.jsonl")


def run_path(output: str) -> str:
    return state_path(output, "run.json")


EMBEDDING_FILES = {"image": ("img_emb", "img_emb_", ".npy"), "text": ("text_emb", "text_emb_", ".npy"),
                   "metadata": ("metadata", "metadata_", ".parquet")}  # clip-retrieval's layout


SAVED_STAMP = "wclip.json"  # in a folder of saved embeddings: {"format", "model", "normalize"} of the run


def embeddings_folder(output: str) -> str:
    return state_path(output, "embeddings")


def embedding_number(name: str) -> str:
    """``N`` of a shard's files in the embeddings folder: its name when that is a number, else 20 digits of a
    hash of the name (numbers sort the same in the three subfolders, which is how readers pair them)."""
    if name.isascii() and name.isdigit():
        return name
    return f"{int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), 'big'):020d}"


def embeddings_path(output: str, name: str, part: str) -> str:
    """Where shard ``name``'s ``part`` (``image``, ``text`` or ``metadata``) of the embeddings goes."""
    folder, prefix, suffix = EMBEDDING_FILES[part]
    return storage.join(embeddings_folder(output), folder, f"{prefix}{embedding_number(name)}{suffix}")
