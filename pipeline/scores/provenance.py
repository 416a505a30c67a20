"""What made a scores file or folder, defined once: the provenance recorded in each file's metadata and marker,
the identity two scores must share to live in one folder (:data:`IDENTITY`), how messages describe it, and the
check that the files a reader is given were made by one fit and model (:func:`check_scores`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.scores.table import file_schema, named_errors, parquet_file

PROVENANCE_KEY = b"wclip"  # a scores file's metadata key: JSON saying what made it (stats, model, input)
SCORES_FORMAT = "wclip-scores/2"


def read_provenance(path):
    """What made a scores file (the JSON under :data:`PROVENANCE_KEY`), or None when wclip did not write
    it (or wrote it before provenance was recorded)."""
    try:
        metadata = file_schema(path).metadata or {}
    except Exception:
        return None
    return provenance_from(metadata)


def provenance_from(metadata) -> Optional[dict]:
    """:func:`read_provenance` of a file whose schema metadata is ``metadata``."""
    raw = (metadata or {}).get(PROVENANCE_KEY)
    if raw == b"scores/1":  # written by wclip before provenance was recorded
        return {"format": "wclip-scores/1"}
    try:
        made = json.loads(raw) if raw else None
    except ValueError:
        return None
    return made if isinstance(made, dict) else None


IDENTITY = ("stats_digest", "model", "normalize")  # what must agree for two scores to share a folder


def identity(made: dict) -> dict:
    """The part of provenance ``made`` that must agree (:data:`IDENTITY`)."""
    return {k: made.get(k) for k in IDENTITY}


def input_info(url: str) -> dict:
    """The input shard as the storage describes it: URL, and size / ETag / modification time when known."""
    info = {"url": url}
    if url.startswith("pipe:"):
        return info
    try:
        fs, p = storage.uncached(url)
        described = fs.info(p)
    except Exception:  # described as far as possible; never a reason to fail the shard
        return info
    for key, value in described.items():
        lower = str(key).lower()
        if lower == "size":
            info["size"] = int(value) if value is not None else None
        elif lower in ("etag", "e_tag"):
            info["etag"] = str(value).strip('"')
        elif lower in ("mtime", "lastmodified", "last_modified", "updated", "created") and "mtime" not in info:
            info["mtime"] = value.isoformat() if hasattr(value, "isoformat") else value
    return info


def describe_provenance(made: dict, normalisation: bool = False) -> str:
    """One line saying what made a scores file or folder: stats digest and path, model and weights (and with
    ``normalisation``, whether the embeddings were L2-normalised)."""
    model = made.get("model") or {}
    if not isinstance(model, dict):
        model = {"model": model}
    line = (f"stats {str(made.get('stats_digest'))[:12]} ({made.get('stats_path', '?')}), model "
            f"{model.get('model', '?')} ({model.get('weights', '?')})")
    return line + (f", {'L2-normalised' if made.get('normalize') else 'raw'} embeddings" if normalisation else "")


@dataclass
class ScoresCheck:
    """What :func:`check_scores` found: rows, the provenance the files share, the files that record none."""

    files: int = 0
    rows: int = 0
    provenance: Optional[dict] = None   # what made the files that record it (all agree)
    example: Optional[str] = None       # one file made by it
    unrecorded: list = field(default_factory=list)  # files that record no provenance

    def warnings(self) -> list:
        if not self.unrecorded:
            return []
        shown = ", ".join(storage.basename(f) for f in self.unrecorded[:3])
        more = f" and {len(self.unrecorded) - 3} more" if len(self.unrecorded) > 3 else ""
        if self.provenance is None:
            return [f"no score file records what made it ({shown}{more}: written by an older wclip or another "
                    f"tool), so the stats and model behind them could not be checked"]
        return [f"{len(self.unrecorded)} of {self.files} score files record no provenance ({shown}{more}: "
                f"written by an older wclip or another tool); they could not be checked against the others"]


def check_scores(files) -> ScoresCheck:
    """Read every score file's footer: refuse a file that is not readable Parquet (naming it) and files
    made by different fits or models (naming both); count the rows."""
    check = ScoresCheck(files=len(files))
    for path in files:
        with named_errors(path), parquet_file(path) as pf:
            check.rows += pf.metadata.num_rows
            made = provenance_from(pf.schema_arrow.metadata)
        if not made or not made.get("stats_digest"):
            check.unrecorded.append(path)
        elif check.provenance is None:
            check.provenance, check.example = made, path
        elif any(made.get(k) != check.provenance.get(k) for k in IDENTITY):
            raise ConfigError(
                f"the score files were made by different fits or models: {check.example} by "
                f"{describe_provenance(check.provenance)}, but {path} by {describe_provenance(made)}; one run "
                f"reads one fit's scores: put each fit's files in a folder of their own")
    return check
