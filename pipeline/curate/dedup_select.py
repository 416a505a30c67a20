"""What ``wclip filter --dedup DIR`` and ``--balance COLUMN`` add to a selection.

* :class:`DedupKept`: the ``kept`` flags of a dedup folder (``wclip dedup``), checked against the scores before
  any work: every score file has its dedup file, with the same rows in the same order, and the score files are
  the ones the dedup read (same sizes). A removed duplicate is not eligible, so fractions are taken of the
  deduplicated rows.
* :func:`balanced_thresholds`: ``--keep-fraction C=F --balance COLUMN`` keeps, in each group of COLUMN (a
  cluster), the best ``q_g`` rows by C, where the ``k = ceil(F * n)`` kept rows are split between the groups in
  proportion to ``n_g ** alpha`` (:func:`pipeline.curate.select.quotas`, default alpha 0.5). Why a power of
  the size: alpha 1 is the plain fraction (large modes keep their share), alpha 0 gives every cluster the same
  number (tiny clusters, often noise, are kept whole); the square root in between shrinks the large modes and
  keeps the rare ones, as density-based pruning does, without a second model of the density.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline import storage
from pipeline.curate.select import RadixSelect, quotas
from pipeline.scores.dedup import settings_path
from pipeline.scores.layout import list_score_files, scores_path
from pipeline.scores.table import float_values, iter_batches, named_errors, ok_mask, read_columns

BALANCE_ALPHA = 0.5


class DedupKept:
    """The ``kept`` column of a dedup folder, per score file (refusals are ValueErrors naming what to do)."""

    def __init__(self, folder: str, files: list):
        self.folder = str(folder)
        made = storage.read_json(settings_path(folder)) if storage.exists(settings_path(folder)) else None
        if made is None:
            raise ValueError(f"--dedup {folder} is not a `wclip dedup` folder (no {settings_path(folder)})")
        recorded = ((made.get("provenance") or {}).get("scores") or {}).get("files") or {}
        self.files = {}
        for path in files:
            name = storage.basename(path)[: -len(".parquet")]
            target = scores_path(folder, name)
            if recorded.get(name) != storage.size(path) or not storage.exists(target):
                raise ValueError(f"--dedup {folder} was not made from these scores: {name}.parquet "
                                 f"{'has no dedup file' if not storage.exists(target) else 'changed since'}; "
                                 f"run `wclip dedup --scores` on this folder again")
            self.files[path] = target
        list_score_files(folder)  # refuses a dedup folder whose markers record missing or changed files
        self.summary = made.get("summary") or {}

    def kept(self, path) -> np.ndarray:
        """Per row of score file ``path``: whether dedup kept it (True also for rows it did not compare)."""
        with named_errors(self.files[path]):
            table = read_columns(self.files[path], ["key", "kept"])
            keys = read_columns(path, ["key"]).column("key")
        if not table.column("key").equals(keys):
            raise ValueError(f"{self.files[path]} does not hold the rows of {path} in order: rerun `wclip dedup`")
        return table.column("kept").to_numpy(zero_copy_only=False).astype(bool)


def eligible(batch, include_failed: bool, kept, start: int) -> np.ndarray:
    """Rows of ``batch`` a condition may keep: status ``ok`` (any with ``include_failed``) and, with a dedup
    folder (``kept``: the file's flags, the batch starting at row ``start``), not a removed duplicate."""
    mask = np.ones(batch.num_rows, bool) if include_failed else ok_mask(batch)
    if kept is not None:
        mask &= kept[start:start + batch.num_rows]
    return mask


def group_values(batch, column: str) -> np.ndarray:
    """The group (cluster) of each row as int64, -1 where null."""
    values = float_values(batch, column)
    return np.where(np.isfinite(values), values, -1).astype(np.int64)


def _streams(files, columns, include_failed, dedup):
    """``(batch, eligible rows)`` over the files."""
    for path in files:
        kept = dedup.kept(path) if dedup else None
        start = 0
        with named_errors(path):
            for batch in iter_batches(path, ["status", *columns]):
                yield batch, eligible(batch, include_failed, kept, start)
                start += batch.num_rows


def balanced_thresholds(files, condition, column: str, alpha: float, include_failed: bool, dedup) -> dict:
    """``{"thresholds": {group: value}, "groups": {group: {"rows", "quota"}}, "ranked", "rank", "passes"}`` of a
    fraction condition split into per-group quotas: exact per-group k-th best values (streaming passes)."""
    sign = 1.0 if condition.keep == "highest" else -1.0
    counts: dict = {}
    for batch, ok in _streams(files, [condition.column, column], include_failed, dedup):
        values, groups = float_values(batch, condition.column), group_values(batch, column)
        use = ok & np.isfinite(values) & (groups >= 0)
        for g, n in zip(*np.unique(groups[use], return_counts=True)):
            counts[int(g)] = counts.get(int(g), 0) + int(n)
    n = sum(counts.values())
    k = math.ceil(condition.value * n)
    quota = quotas(counts, k, alpha)
    selectors = {g: RadixSelect(condition.value, rank=q) for g, q in quota.items()}
    passes = 0
    while any(not s.done for s in selectors.values()):
        for batch, ok in _streams(files, [condition.column, column], include_failed, dedup):
            values, groups = float_values(batch, condition.column), group_values(batch, column)
            use = ok & np.isfinite(values)
            for g in np.unique(groups[use & (groups >= 0)]):
                selectors[int(g)].update(sign * values[use & (groups == g)])
        for s in selectors.values():
            s.finish_pass()
        passes += 1
    thresholds = {g: sign * s.threshold for g, s in selectors.items()}
    return {"thresholds": thresholds, "ranked": n, "rank": k, "passes": passes, "alpha": alpha,
            "groups": {g: {"rows": counts[g], "quota": quota[g]} for g in sorted(counts)}}


def group_thresholds(groups: np.ndarray, thresholds: dict) -> np.ndarray:
    """Per row its group's threshold (NaN: a row of no group, or of a group with no quota)."""
    out = np.full(len(groups), np.nan)
    for g, t in thresholds.items():
        out[groups == g] = t
    return out
