"""Stats files: whitening statistics of one or more towers plus JSON provenance, as safetensors.

Loading validates everything before use and never unpickles; any problem is a
:class:`StatsFileError` saying what is wrong and what to do.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import StatsFileError
from pipeline.whitening.stats import TENSORS, WhiteningStats

FORMAT = "wclip-stats/2"  # /2: a digest ties the metadata to the tensors
_TOWER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def content_digest(tensors: dict, header: str) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order) and the JSON metadata: editing
    either (normalisation flipped, another model claimed) no longer matches the digest saved with them."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    digest.update(b"|" + header.encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class StatsFile:
    """Whitening statistics of one or more towers (``image``, ``text``) plus JSON metadata.

    On disk: safetensors with float64 tensors ``{tower}.mean``, ``{tower}.whitening``,
    ``{tower}.eigenvalues``, ``{tower}.calibration`` and string metadata ``format``
    (``wclip-stats/1``) and ``wclip`` (JSON: the caller's metadata plus ``format``,
    ``towers``, per-tower ``summary``, ``created`` and ``wclip_version`` when missing).
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

    def save(self, path) -> Path:
        """Write the file crash-safe (:func:`pipeline.storage.write_atomic`); returns its path."""
        from safetensors.numpy import save as to_bytes

        import pipeline
        from pipeline.storage import write_atomic

        path = Path(path)
        tensors = {f"{t}.{name}": np.ascontiguousarray(getattr(ws, name), dtype="<f8").copy()
                   for t, ws in self.towers.items() for name in TENSORS}
        meta = dict(self.metadata)
        meta.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())
        meta.setdefault("wclip_version", pipeline.__version__)
        meta.update(format=FORMAT, towers=list(self.towers),
                    summary={t: ws.summary() for t, ws in self.towers.items()})
        header = json.dumps(meta, allow_nan=False)
        write_atomic(str(path), to_bytes(tensors, metadata={"format": FORMAT, "wclip": header,
                                                            "digest": content_digest(tensors, header)}))
        return path

    @classmethod
    def load(cls, path, dim: int | None = None) -> "StatsFile":
        """Read and validate a stats file; ``dim`` (optional) is the embedding size expected.

        Anything else raises :class:`StatsFileError`; nothing is ever unpickled.
        """
        path = Path(path)
        redo = "Re-run `wclip fit` to create a valid stats file."

        def fail(what):
            return StatsFileError(f"{path} is not a valid wclip stats file: {what}. {redo}")

        if not path.is_file():
            raise StatsFileError(f"stats file {path} does not exist. Run `wclip fit` to create it.")
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
        if size < 10 or not 2 <= int.from_bytes(head[:8], "little") <= size - 8 or head[8:9] != b"{":
            raise fail(f"no safetensors header ({size} bytes; a pickle, truncated or foreign file?)")
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="numpy") as f:
                header, names = f.metadata() or {}, set(f.keys())
                if header.get("format") != FORMAT:
                    raise fail(f"format is {header.get('format')!r}, expected {FORMAT!r}")
                meta = json.loads(header["wclip"])
                towers = meta["towers"]
                want = {f"{t}.{n}" for t in towers for n in TENSORS}
                if names != want:
                    raise fail(f"missing tensors {sorted(want - names)}, unexpected "
                               f"{sorted(names - want)}")
                arrays = {name: f.get_tensor(name) for name in sorted(names)}
                if header.get("digest") != content_digest(arrays, header["wclip"]):
                    raise StatsFileError(f"{path} was changed after `wclip fit` wrote it: its metadata or tensors "
                                         f"no longer match the digest recorded with them (an edited header?). "
                                         f"{redo}")
        except StatsFileError:
            raise
        except Exception as exc:  # safetensors, JSON and key errors: all mean a bad file
            raise fail(f"{type(exc).__name__}: {exc}") from exc
        out = {}
        for t in towers:
            try:
                summ = meta["summary"][t]
                if any(arrays[f"{t}.{n}"].dtype != np.float64 for n in TENSORS):
                    raise ValueError("tensors must be float64")
                ws = WhiteningStats(
                    **{n: arrays[f"{t}.{n}"] for n in TENSORS}, n_fit=summ["n_fit"],
                    shrinkage=summ["shrinkage"],
                    diagnostics={k: summ.get(k) for k in
                                 ("fit_sqnorm_over_m", "normality_fit", "normality_heldout")})
                if (summ["dim"], summ["components"], summ["n_heldout"]) != \
                        (ws.dim, ws.components, ws.n_heldout):
                    raise ValueError("recorded dim/components/n_heldout do not match the tensors")
            except (ValueError, KeyError, TypeError) as exc:
                raise fail(f"tower {t!r}: {exc}") from exc
            if dim is not None and ws.dim != dim:
                raise StatsFileError(f"{path}: tower {t!r} was fitted on {ws.dim}-dimensional "
                                     f"embeddings, but this model produces {dim}. Fit stats for "
                                     "this model with `wclip fit`.")
            out[t] = ws
        return cls(towers=out, metadata=meta)
