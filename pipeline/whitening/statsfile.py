"""Stats files: whitening statistics of one or more towers plus JSON provenance, as safetensors.

:class:`StatsFile` is the container the jobs read and write; the towers' tensors are
:func:`pipeline.whitening.stats.write_towers` / :func:`~pipeline.whitening.stats.read_towers`, the bytes and
the digest :mod:`pipeline.whitening.fileformat`. Loading validates everything before use and never
unpickles; any problem is a :class:`StatsFileError` saying what is wrong and what to do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import StatsFileError
from pipeline.whitening.fileformat import FORMAT
from pipeline.whitening.stats import WhiteningStats, read_towers, write_towers

__all__ = ["StatsFile", "StatsFileError", "FORMAT"]

_TOWER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class StatsFile:
    """Whitening statistics of one or more towers (``image``, ``text``) plus JSON metadata.

    On disk: safetensors with float64 tensors ``{tower}.mean``, ``{tower}.whitening``,
    ``{tower}.eigenvalues``, ``{tower}.calibration`` (and ``{tower}.clusters.*`` for the local likelihood)
    and string metadata ``format`` (:data:`FORMAT`), ``digest`` and ``wclip`` (JSON: the caller's metadata
    plus ``format``, ``towers``, per-tower ``summary``, ``created`` and ``wclip_version`` when missing).
    """

    towers: dict
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.towers:
            raise ValueError("a stats file needs at least one tower")
        for name, ws in self.towers.items():
            if not isinstance(name, str) or not _TOWER_NAME.match(name):
                raise ValueError(f"tower names must match [A-Za-z0-9_-]+; got {name!r}")
            if not isinstance(ws, WhiteningStats):
                raise ValueError(f"tower {name!r} must be a WhiteningStats; got {type(ws).__name__}")
        try:
            metadata = json.loads(json.dumps(dict(self.metadata), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be a JSON-able dict: {exc}") from exc
        object.__setattr__(self, "towers", dict(self.towers))
        object.__setattr__(self, "metadata", metadata)

    @property
    def clustered(self) -> bool:
        """Whether any tower has the local likelihood's clusters."""
        return any(ws.clusters is not None for ws in self.towers.values())

    def save(self, path) -> Path:
        """Write the file crash-safe (:func:`pipeline.storage.write_atomic`); returns its path."""
        return write_towers(path, self.towers, self.metadata)

    @classmethod
    def load(cls, path, dim: int | None = None) -> "StatsFile":
        """Read and validate a stats file; ``dim`` (optional) is the embedding size expected.

        Anything else raises :class:`StatsFileError`; nothing is ever unpickled.
        """
        towers, meta = read_towers(path, dim=dim)
        return cls(towers=towers, metadata=meta)
