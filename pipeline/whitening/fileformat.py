"""The stats file on disk: safetensors tensors plus JSON metadata tied to them by a digest.

This module knows bytes, names and digests, not what the tensors mean: :mod:`pipeline.whitening.stats`
turns towers into tensors and back. Reading validates before use and never unpickles; any problem is a
:class:`StatsFileError` saying what is wrong and what to do.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.errors import StatsFileError

FORMAT = "wclip-stats/4"  # /2: a digest ties the metadata to the tensors; /3: optional cluster tensors; /4: optional
#                           per-cluster directions (clusters.factors)
READABLE = ("wclip-stats/2", "wclip-stats/3", FORMAT)  # a /2 file is a /3 file without clusters, a /3 one a /4
#                                                        file without factors
REDO = "Re-run `wclip fit` to create a valid stats file."


def content_digest(tensors: dict, header: str) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order) and the JSON metadata: editing
    either (normalisation flipped, another model claimed) no longer matches the digest saved with them."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    digest.update(b"|" + header.encode("utf-8"))
    return digest.hexdigest()


def write(path, tensors: dict, metadata: dict) -> Path:
    """Write float64 ``tensors`` and ``metadata`` (JSON-able; ``created`` and ``wclip_version`` added when
    missing, ``format`` set) crash-safe (:func:`pipeline.storage.write_atomic`); returns the path."""
    from safetensors.numpy import save as to_bytes

    from pipeline import __version__
    from pipeline.storage import write_atomic

    path = Path(path)
    tensors = {name: np.ascontiguousarray(a, dtype="<f8").copy() for name, a in tensors.items()}
    meta = dict(metadata)
    meta.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat())
    meta.setdefault("wclip_version", __version__)
    meta["format"] = FORMAT
    header = json.dumps(meta, allow_nan=False)
    write_atomic(str(path), to_bytes(tensors, metadata={"format": FORMAT, "wclip": header,
                                                        "digest": content_digest(tensors, header)}))
    return path


def invalid(path, what: str) -> StatsFileError:
    """The error for a file that is not a valid stats file."""
    return StatsFileError(f"{path} is not a valid wclip stats file: {what}. {REDO}")


def read(path, expected) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a stats file, its header, format, tensor names and digest checked;
    ``expected(metadata)`` gives the ``(required, optional)`` tensor names."""
    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"stats file {path} does not exist. Run `wclip fit` to create it.")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    if size < 10 or not 2 <= int.from_bytes(head[:8], "little") <= size - 8 or head[8:9] != b"{":
        raise invalid(path, f"no safetensors header ({size} bytes; a pickle, truncated or foreign file?)")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            if header.get("format") not in READABLE:
                raise invalid(path, f"format is {header.get('format')!r}, expected one of {', '.join(READABLE)}")
            meta = json.loads(header["wclip"])
            required, optional = expected(meta)
            names = set(f.keys())
            if not required <= names or not names <= required | optional:
                raise invalid(path, f"missing tensors {sorted(required - names)}, unexpected "
                                    f"{sorted(names - required - optional)}")
            arrays = {name: f.get_tensor(name) for name in sorted(f.keys())}
            if header.get("digest") != content_digest(arrays, header["wclip"]):
                raise StatsFileError(f"{path} was changed after `wclip fit` wrote it: its metadata or tensors no "
                                     f"longer match the digest recorded with them (an edited header?). {REDO}")
    except StatsFileError:
        raise
    except Exception as exc:  # safetensors, JSON and key errors: all mean a bad file
        raise invalid(path, f"{type(exc).__name__}: {exc}") from exc
    return arrays, meta
