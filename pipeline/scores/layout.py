"""The scores folder's layout, defined once: where each file wclip keeps lives, reading the completion markers
back, and the completeness check every reader of a folder runs first.

The scores folder holds only score Parquet files (``<shard>.parquet``), so pandas, pyarrow, duckdb and
Hugging Face ``datasets`` read it as it is. Everything else wclip keeps lives apart, under ``.wclip/``
(hidden, so those readers skip it)::

    DIR/<shard>.parquet                 the scores, with what made them in the file's metadata
    DIR/.wclip/run.json                 what made the folder: stats digest, model, normalisation
    DIR/.wclip/lock                     held by the run writing the folder (pipeline.scores.folder.claim_folder)
    DIR/.wclip/shards/<shard>.json      completion marker, written last: counts, timing, provenance
    DIR/.wclip/failures.jsonl           shards that failed every attempt
    DIR/.wclip/embeddings/              --save-embeddings, in clip-retrieval's layout:
        img_emb/img_emb_<N>.npy  text_emb/text_emb_<N>.npy  metadata/metadata_<N>.parquet

A shard is done when its marker exists, was made by the same stats and model, and its Parquet file is
there with the size the marker recorded (with ``--save-embeddings``: and its embeddings were saved).

The embeddings folder is what ``clip-retrieval inference`` writes, so ``clip-retrieval index`` and autofaiss
read it as it is (``--embeddings_folder DIR/.wclip/embeddings``), and so does ``wclip fit/score --embeddings``.
Per shard, ``N`` is the shard's name when it is a number (``00042.tar`` -> ``img_emb_00042.npy``), else a
20-digit number from a hash of the name; either way it depends on the shard alone, so a resumed or extended
run never renumbers.
"""

from __future__ import annotations

import hashlib
import json

from pipeline import storage
from pipeline.errors import ConfigError

STATE_DIR = ".wclip"  # hidden: every Parquet reader and Hugging Face datasets skip it
SCORES_SUFFIX = ".parquet"


def state_path(output: str, *names: str) -> str:
    return storage.join(output, STATE_DIR, *names)


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
            if e.get("type") == "file" and storage.basename(e["name"]).endswith(suffix)}


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
    check_complete(directory)
    return [f for f in storage.list_files(directory, ".parquet")
            if not storage.basename(f).startswith(".") and not f.endswith(".tmp")]


LOCK = "lock"  # DIR/.wclip/lock: held by the run writing the folder (local folders)


def failures_path(output: str) -> str:
    return state_path(output, "failures.jsonl")


def run_path(output: str) -> str:
    return state_path(output, "run.json")


EMBEDDING_FILES = {"image": ("img_emb", "img_emb_", ".npy"), "text": ("text_emb", "text_emb_", ".npy"),
                   "metadata": ("metadata", "metadata_", ".parquet")}  # clip-retrieval's layout


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
