"""What a card tells the Hugging Face Hub: the dataset's license id and where its scores are, as ``configs``
/ ``data_files`` in the README's YAML header, so the Hub's dataset viewer shows the scores.

Layout. The card copies no data: ``data_files`` is a glob relative to the README, as the Hub resolves it
inside the dataset repository. By default it is the scores folder's path below the card folder when the
scores lie inside it (``wclip card --scores REPO/scores --output REPO`` gives ``scores/*.parquet``), else
``<name of the scores folder>/*.parquet``: the README then says to upload the score files there.
``--data-files`` sets the glob. The license defaults to ``unknown``: the images and captions belong to
their authors and wclip cannot know under which terms the corpus may be shared (``other`` would claim a
custom license; the Hub expects ``license_name`` / ``license_link`` with it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from pipeline import storage
from pipeline.card.markdown import code

DEFAULT_LICENSE = "unknown"
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")  # Hub license ids: apache-2.0, mit, cc-by-4.0, other, ...


@dataclass(frozen=True)
class HubOptions:
    """The card's Hub metadata."""

    license: str = DEFAULT_LICENSE     # Hugging Face license id (lower case, e.g. cc-by-4.0, mit, unknown)
    data_files: Optional[str] = None   # glob of the score files relative to the README (None: see module doc)

    def __post_init__(self):
        if not _LICENSE.match(self.license or ""):
            raise ValueError(f"--license must be a Hugging Face license id (lower case, e.g. apache-2.0, mit, "
                             f"cc-by-4.0, other, unknown); got {self.license!r}")
        if self.data_files is not None:
            check_relative(self.data_files)


def check_relative(glob: str) -> None:
    """Refuse a ``data_files`` glob the Hub cannot resolve inside the repository."""
    parts = glob.replace("\\", "/").split("/")
    if not glob.strip() or "://" in glob or glob.startswith(("/", "\\")) or ".." in parts:
        raise ValueError(f"--data-files must be a glob relative to the card's README inside the dataset "
                         f"repository (e.g. scores/*.parquet); got {glob!r}")


def _relative(scores, output) -> Optional[str]:
    """The scores folder's path below the card folder, or None when it is not inside it."""
    scores, output = str(scores).rstrip("/"), str(output).rstrip("/")
    if storage.is_url(scores) or storage.is_url(output):
        return scores[len(output) + 1:] if scores.startswith(output + "/") else None
    inside = os.path.relpath(os.path.abspath(scores), os.path.abspath(output)).replace(os.sep, "/")
    return None if inside == ".." or inside.startswith("../") else inside


def data_files_glob(scores, output, given: Optional[str] = None) -> str:
    """The ``data_files`` glob of a card written to ``output`` for the score files in ``scores``."""
    if given:
        return given
    inside = _relative(scores, output)
    folder = inside if inside is not None else storage.basename(str(scores))
    return "*.parquet" if folder in ("", ".") else f"{folder}/*.parquet"


def header_fields(hub: dict) -> dict:
    """The YAML header's ``license`` and ``configs`` (one config, one split: train)."""
    return {"license": hub["license"],
            "configs": [{"config_name": "default",
                         "data_files": [{"split": "train", "path": hub["data_files"]}]}]}


def data_section(hub: dict) -> list:
    """The README's lines on where the viewer finds the data."""
    lines = [f"The Hub's dataset viewer reads {code(hub['data_files'])} (relative to this README, "
             f"`configs` in the YAML header): the score files, one row per sample."]
    if not hub.get("inside"):
        folder = hub["data_files"].rsplit("/", 1)[0] if "/" in hub["data_files"] else "."
        upload = f"huggingface-cli upload REPO_ID {hub['scores']} {folder} --repo-type dataset --include '*.parquet'"
        lines.append(f"Upload the score files (`*.parquet` of {code(hub['scores'])}) to {code(folder + '/')} of the "
                     f"dataset repository, e.g. {code(upload)}, and this card's folder to its root.")
    lines.append(f"License: {code(hub['license'])}"
                 + (" (not known to wclip: set it with `wclip card --license ID`)." if hub["license"] == "unknown"
                    else "."))
    return [" ".join(lines), ""]


def hub_section(scores, output, options: HubOptions) -> dict:
    """What ``card.json`` records for the Hub."""
    return {"license": options.license, "data_files": data_files_glob(scores, output, options.data_files),
            "scores": str(scores), "inside": _relative(scores, output) is not None}
