"""The generated world on disk: img2dataset-style WebDataset shards (``NNNNN.tar`` with ``.jpg``, ``.txt`` and
``.json`` per sample, plus ``NNNNN.parquet`` and ``NNNNN_stats.json`` beside each), written crash-safe through
:mod:`pipeline.storage`, and their labels read back. Same seed, same bytes.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.demo import world
from pipeline.storage import open_atomic, write_atomic

TAR_MTIME = 946684800          # 2000-01-01, fixed so tars are byte-identical across runs


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Iterable[tuple[str, world.WorldSample]]) -> dict:
    """Write one tar plus its ``.parquet`` and ``_stats.json`` beside it, each crash-safe; return the stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start, rows = time.time(), []
    with open_atomic(path) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in samples:
            _add(tar, f"{key}.jpg", sample.image)
            _add(tar, f"{key}.txt", sample.caption.encode())
            _add(tar, f"{key}.json", json.dumps(sample.labels, sort_keys=True).encode())
            rows.append({k: (json.dumps(v) if k == "objects" else v) for k, v in sample.labels.items()})
    with open_atomic(path.with_suffix(".parquet")) as fh:
        pq.write_table(pa.Table.from_pylist(rows), fh)
    anomalies: dict = {}
    for row in rows:
        if row["anomaly"]:
            anomalies[row["anomaly"]] = anomalies.get(row["anomaly"], 0) + 1
    end = time.time()
    stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
             "duration": end - start, "start_time": start, "end_time": end,
             "status_dict": {"success": len(rows)}, "anomalies": anomalies}
    write_atomic(path.with_name(path.stem + "_stats.json"), json.dumps(stats, indent=2, sort_keys=True).encode())
    return stats


def generate_world(output_dir, shards: int, samples_per_shard: int, seed: int,
                   anomaly_rate: float = 0.0, anomaly_kinds: Sequence[str] | None = None,
                   vocabulary: str = "reference", unseen_pairs: bool = False,
                   duplicate_rate: float = 0.0) -> list[Path]:
    """Write ``shards`` tar shards of ``samples_per_shard`` pairs each; return the tar paths.

    ``unseen_pairs``: the world withholds :data:`~pipeline.demo.world.UNSEEN_PAIRS` but as anomalies;
    ``duplicate_rate``: that share of each shard's rows are near-duplicates of another row of it (labelled
    ``duplicate_of``)."""
    if shards < 1 or samples_per_shard < 1:
        raise ValueError(f"shards and samples_per_shard must be >= 1, got {shards} and {samples_per_shard}")
    kinds = world.validate(anomaly_rate, anomaly_kinds, vocabulary, unseen_pairs, duplicate_rate)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_digits = max(5, len(str(shards - 1)))
    key_digits = max(4, math.ceil(math.log10(samples_per_shard)))
    paths = []
    for shard in range(shards):
        path = out / f"{shard:0{shard_digits}d}.tar"
        write_shard(path, world.iter_world(seed, shard, samples_per_shard, anomaly_rate, kinds, key_digits, vocabulary,
                                           unseen_pairs, duplicate_rate))
        paths.append(path)
    return paths


def read_labels(path) -> list[dict]:
    """The labels of every sample under ``path`` (a world folder, a ``.tar`` or a ``.parquet``), by key."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
    elif path.suffix == ".tar" and not path.with_suffix(".parquet").exists():
        with tarfile.open(path) as tar:
            rows = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        return sorted(rows, key=lambda r: r["key"])
    else:
        files = [path.with_suffix(".parquet")]
    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    for row in rows:
        row["objects"] = json.loads(row["objects"])
    return sorted(rows, key=lambda r: r["key"])
