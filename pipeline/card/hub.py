"""What a card tells the Hugging Face Hub: the dataset's license id and where its scores are, as ``configs``
/ ``data_files`` in the README's YAML header, so the Hub's dataset viewer shows the scores; and how to upload.

Layout: the card folder is the dataset repository, as written. ``data_files`` is a glob relative to the README,
as the Hub resolves it inside the repository:

* scores inside the card folder (``wclip card --scores REPO/scores --output REPO``): their path below it
  (``scores/*.parquet``); nothing is copied;
* scores elsewhere (``wclip card --scores scores/ --output card/``): the score files (``*.parquet`` only, not
  wclip's bookkeeping) are copied into ``card/<name of the scores folder>/`` and the glob names that folder,
  so the folder publishes as it is (``hf upload REPO_ID card/ . --repo-type dataset``). A rerun replaces its
  own copies (``card.json`` lists them) and removes those of score files that are gone; a file there that the
  card did not copy and that differs from the score file of its name is refused, never replaced;
* ``--data-files GLOB``: the glob as given and no copy: the README says how to upload the score files there.

The license defaults to ``unknown``: the images and captions belong to their authors and wclip cannot know
under which terms the corpus may be shared (``other`` would claim a custom license; the Hub expects
``license_name`` / ``license_link`` with it).
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


def copy_folder(scores) -> str:
    """The folder of the card that score files from elsewhere are copied to: the scores folder's name."""
    name = storage.basename(str(scores))
    return "scores" if name in ("", ".", "..") else name


def data_files_glob(scores, output, given: Optional[str] = None) -> str:
    """The ``data_files`` glob of a card written to ``output`` for the score files in ``scores``."""
    if given:
        return given
    inside = _relative(scores, output)
    folder = inside if inside is not None else copy_folder(scores)
    return "*.parquet" if folder in ("", ".") else f"{folder}/*.parquet"


@dataclass(frozen=True)
class Copies:
    """The score files a card copies into its folder (scores from elsewhere, no ``--data-files``)."""

    folder: str         # in the card folder
    files: tuple        # (source score file, target) pairs
    stale: tuple        # earlier copies of score files that are gone: removed

    def run(self) -> list:
        """Copy the files (crash-safe), remove the stale copies; returns the copied names."""
        import shutil

        storage.makedirs(self.folder)
        for source, target in self.files:
            with storage.open_read(source) as src, storage.open_atomic(target) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        for path in self.stale:
            storage.remove(path)
        return [storage.basename(t) for _, t in self.files]


def plan_copies(files, scores, output, options: "HubOptions") -> Optional[Copies]:
    """What :meth:`Copies.run` will copy, or None (scores inside the card folder, or ``--data-files``).
    Raises ValueError, before any work, for a file in the target folder that the card did not copy (not
    listed by the folder's ``card.json``) and that differs from the score file of its name."""
    if options.data_files or _relative(scores, output) is not None:
        return None
    folder = storage.join(str(output), copy_folder(scores))
    card_json = storage.join(str(output), "card.json")
    earlier = set((storage.read_json(card_json).get("hub") or {}).get("copied") or []) \
        if storage.exists(card_json) else set()
    pairs = [(f, storage.join(folder, storage.basename(f))) for f in files]
    for source, target in pairs:
        name = storage.basename(target)
        if name not in earlier and storage.exists(target) and storage.sha256(target) != storage.sha256(source):
            raise ValueError(f"{target} exists and was not copied there by `wclip card`: move it away (the card "
                             f"copies the score files to {folder}/), or pass another --output")
    names = {storage.basename(t) for _, t in pairs}
    stale = [p for p in storage.list_files(folder, ".parquet") if storage.basename(p) in earlier - names]
    return Copies(folder, tuple(pairs), tuple(stale))


def header_fields(hub: dict) -> dict:
    """The YAML header's ``license`` and ``configs`` (one config, one split: train)."""
    return {"license": hub["license"],
            "configs": [{"config_name": "default",
                         "data_files": [{"split": "train", "path": hub["data_files"]}]}]}


UPLOAD = "hf upload REPO_ID {local} {remote} --repo-type dataset"  # huggingface_hub's `hf` command line
EXCLUDE_STATE = "--exclude '*.wclip/*'"  # wclip's bookkeeping (DIR.wclip/, beside score files) is not data


def data_section(hub: dict) -> list:
    """The README's lines on where the viewer finds the data, and the upload commands."""
    lines = [f"The Hub's dataset viewer reads {code(hub['data_files'])} (relative to this README, "
             f"`configs` in the YAML header): the score files, one row per sample."]
    card = hub.get("output") or "CARD_FOLDER"
    whole = UPLOAD.format(local=card, remote=".") + " " + EXCLUDE_STATE
    if hub.get("copied"):
        lines.append(f"They were copied here from {code(hub['scores'])} ({len(hub['copied'])} files), so this folder "
                     f"is the dataset repository as it is; publish it with {code(whole)}.")
    elif hub.get("inside"):
        lines.append(f"Publish this folder as the dataset repository with {code(whole)}.")
    else:
        folder = hub["data_files"].rsplit("/", 1)[0] if "/" in hub["data_files"] else "."
        scores = UPLOAD.format(local=hub["scores"], remote=folder) + " --include '*.parquet'"
        lines.append(f"Upload the score files (`*.parquet` of {code(hub['scores'])}) to {code(folder + '/')} of the "
                     f"dataset repository, e.g. {code(scores)}, and this card's folder to its root: "
                     f"{code(UPLOAD.format(local=card, remote='.'))}.")
    lines.append(f"License: {code(hub['license'])}"
                 + (" (not known to wclip: set it with `wclip card --license ID`)." if hub["license"] == "unknown"
                    else "."))
    return [" ".join(lines), ""]


def hub_section(scores, output, options: HubOptions, copied: Optional[list] = None) -> dict:
    """What ``card.json`` records for the Hub; ``copied``: the names of the score files copied into the card."""
    return {"license": options.license, "data_files": data_files_glob(scores, output, options.data_files),
            "scores": str(scores), "output": str(output), "inside": _relative(scores, output) is not None,
            "copied": copied or []}
