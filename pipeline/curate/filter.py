"""Select the rows of a scores directory by thresholds and top fractions of score columns.

Semantics (also in ``wclip filter --help``):

- A row is *eligible* when ``status == "ok"`` (every row with ``include_failed``).
- ``min COLUMN=V`` keeps ``value >= V``; ``max COLUMN=V`` keeps ``value <= V``.
- ``fraction COLUMN=F`` keeps the best fraction ``F`` of the eligible rows that have a value
  in COLUMN: the highest values, except for ``*_sqnorm`` columns where lower means more likely
  and the lowest are kept; ``COLUMN:highest=F`` / ``COLUMN:lowest=F`` choose explicitly. The
  threshold is the exact k-th best value with ``k = ceil(F * n)``, each fraction resolved on
  its own over all eligible rows; every row tied with the threshold is kept, so a fraction
  keeps at least ``k`` rows (more only on ties).
- A kept row is eligible and passes every condition; a missing or non-finite value fails.
- The local likelihood's columns (:data:`pipeline.scores.table.LOCAL_COLUMNS`, in scores of stats fitted with
  ``--clusters K``) are conditions like any other: ``*_local_loglik`` and ``*_local_pvalue`` keep their
  highest values; ``<tower>_cluster`` is a cluster number, selected with ``min``/``max`` (a fraction of it
  is refused). Asked of scores without them, they are refused before any work, saying how to get them.

Refused before any work: a score file that is not readable Parquet, score files made by different fits
or models (:func:`pipeline.scores.provenance.check_scores`), a condition on a column the scores lack, and ``--input``
shards none of which was scored.

Memory: thresholds come from :class:`pipeline.curate.select.RadixSelect` (exact, a few streaming
passes); rows are streamed in Parquet batches; uids are spilled in sorted runs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import FilterConfig
from pipeline.curate.dedup_select import (
    BALANCE_ALPHA,
    DedupKept,
    balanced_thresholds,
    group_thresholds,
    group_values,
)
from pipeline.curate.dedup_select import eligible as eligible_rows
from pipeline.curate.select import RadixSelect
from pipeline.curate.uids import UidCollector, parse_uids
from pipeline.scores.provenance import check_scores
from pipeline.scores.table import (
    ALL_SCORE_COLUMNS,
    CLUSTER_COLUMNS,
    LOCAL_COLUMNS,
    file_schema,
    float_values,
    iter_batches,
    named_errors,
    parquet_file,
)

KINDS = ("min", "max", "fraction")
DIRECTIONS = ("highest", "lowest")


def default_direction(column: str) -> str:
    """Which end of a column a fraction keeps by default: the more likely / better one."""
    return "lowest" if column.endswith("_sqnorm") else "highest"


@dataclass(frozen=True)
class Condition:
    """One filter condition: a bound (``min``/``max``) or a top fraction (``fraction``)."""

    kind: str         # "min", "max" or "fraction"
    column: str       # a numeric column of the scores
    value: float      # the bound, or the fraction of rows to keep in [0, 1]
    keep: str = ""    # fractions only: "highest" or "lowest" ("" = the column's default)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"condition kind must be one of {KINDS}; got {self.kind!r}")
        if not self.column:
            raise ValueError("condition needs a column name")
        if not math.isfinite(self.value):
            raise ValueError(f"{self.column}: the value must be a finite number; got {self.value}")
        if self.kind == "fraction":
            if self.column in CLUSTER_COLUMNS:
                raise ValueError(f"{self.column} is a cluster number, not a score: keep one cluster with "
                                 f"--min {self.column}=J --max {self.column}=J")
            if not 0.0 <= self.value <= 1.0:
                raise ValueError(f"{self.column}: a fraction must be in [0, 1]; got {self.value}")
            keep = self.keep or default_direction(self.column)
            if keep not in DIRECTIONS:
                raise ValueError(f"{self.column}: keep must be one of {DIRECTIONS}; got {keep!r}")
            object.__setattr__(self, "keep", keep)
        elif self.keep:
            raise ValueError(f"{self.column}: only fractions take a direction")

    @classmethod
    def parse(cls, kind: str, text: str) -> "Condition":
        """From ``COLUMN=VALUE`` (fractions: ``COLUMN[:highest|:lowest]=F``, F may be ``30%``)."""
        name, eq, raw = text.partition("=")
        if not eq or not name.strip() or not raw.strip():
            raise ValueError(f"expected COLUMN=VALUE, got {text!r}")
        column, _, keep = name.strip().partition(":")
        raw = raw.strip()
        try:
            value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise ValueError(f"{text!r}: {raw!r} is not a number") from None
        return cls(kind, column, value, keep)

    @property
    def spec(self) -> str:
        if self.kind == "fraction":
            return f"keep the {self.keep} {self.value:.6g} of {self.column}"
        return f"{self.column} {'>=' if self.kind == 'min' else '<='} {self.value:.6g}"


@dataclass
class Resolved:
    """A condition with its threshold resolved to a value, and how many eligible rows pass it."""

    condition: Condition
    op: str                   # ">=" or "<="
    threshold: float
    ranked: int | None = None  # fractions: eligible rows with a value
    rank: int | None = None    # fractions: k
    passes: int = 0            # fractions: streaming passes used
    passed: int = 0            # eligible rows passing this condition alone
    by: str = ""               # --balance: the group column whose groups have thresholds of their own
    balance: dict | None = None  # --balance: thresholds, quotas and kept rows per group

    def mask(self, values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        threshold = self.threshold if groups is None else group_thresholds(groups, self.balance["thresholds"])
        with np.errstate(invalid="ignore"):
            hit = values >= threshold if self.op == ">=" else values <= threshold
        return hit & np.isfinite(values)

    def to_json(self, eligible: int) -> dict:
        c = self.condition
        return {"kind": c.kind, "column": c.column, "value": c.value, "keep": c.keep or None,
                "spec": c.spec, "op": self.op, "threshold": storage.jsonable(self.threshold),
                "ranked": self.ranked, "rank": self.rank, "passed": self.passed,
                "passed_fraction": self.passed / eligible if eligible else None,
                **({"balance": storage.jsonable({"column": self.by, **{k: v for k, v in self.balance.items()
                                                                         if k != "thresholds"}})}
                   if self.by else {})}


def check_columns(files, conditions) -> bool:
    """Raise ValueError when a condition names a column no score file has (a local likelihood column: say
    how to get it), or a text column. Returns whether the scores have the local likelihood's columns."""
    schema = file_schema(files[0])
    present = set(schema.names) | set(file_schema(files[-1]).names)
    local = set(LOCAL_COLUMNS) <= present
    for c in conditions:
        if c.column in LOCAL_COLUMNS and c.column not in present:
            raise ValueError(f"no column {c.column!r} in the scores: it is the local likelihood's, written only "
                             f"when the stats have clusters; fit with `wclip fit --clusters K`, then score again")
        if c.column not in present:
            known = [n for n in ALL_SCORE_COLUMNS + CLUSTER_COLUMNS if n in present] or ALL_SCORE_COLUMNS
            raise ValueError(f"no column {c.column!r} in the scores; score columns are {', '.join(known)}")
        if c.column in schema.names:
            kind = schema.field(c.column).type
            if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
                raise ValueError(f"column {c.column!r} is {kind}, not a number")
    return local


def resolve(files, conditions, include_failed: bool = False, progress=None, dedup=None, balance=None,
            alpha: float = BALANCE_ALPHA) -> list[Resolved]:
    """Turn conditions into thresholds; fractions take a few streaming passes (exact). ``dedup``: a
    :class:`DedupKept` (removed duplicates are not eligible); ``balance``: a group column, whose groups get
    fractions of their own (:func:`balanced_thresholds`)."""
    resolved, selectors = [], {}
    for i, c in enumerate(conditions):
        if c.kind == "fraction" and balance:
            split = balanced_thresholds(files, c, balance, alpha, include_failed, dedup)
            resolved.append(Resolved(c, ">=" if c.keep == "highest" else "<=", math.nan, split["ranked"],
                                     split["rank"], split["passes"], by=balance, balance=split))
        elif c.kind == "fraction":
            selectors[i] = RadixSelect(c.value)
            resolved.append(Resolved(c, ">=" if c.keep == "highest" else "<=", math.nan))
        else:
            resolved.append(Resolved(c, ">=" if c.kind == "min" else "<=", c.value))
    columns = sorted({conditions[i].column for i in selectors})
    while any(not s.done for s in selectors.values()):
        for path in files:
            kept, start = (dedup.kept(path) if dedup else None), 0
            with named_errors(path):
                for batch in iter_batches(path, ["status", *columns]):
                    eligible = eligible_rows(batch, include_failed, kept, start)
                    start += batch.num_rows
                    for i, sel in selectors.items():
                        values = float_values(batch, conditions[i].column)[eligible]
                        values = values[np.isfinite(values)]
                        sel.update(values if conditions[i].keep == "highest" else -values)
        for sel in selectors.values():
            sel.finish_pass()
        if progress:
            progress()
    for i, sel in selectors.items():
        r = resolved[i]
        r.threshold = sel.threshold if r.op == ">=" else -sel.threshold
        r.ranked, r.rank, r.passes = sel.n, sel.k, sel.passes
    return resolved


@dataclass
class FilterResult:
    """What :func:`apply` kept, with counts for the report and ``filter.json``."""

    rows: int = 0
    eligible: int = 0
    kept: int = 0
    status: Counter = field(default_factory=Counter)
    shards: dict = field(default_factory=dict)    # shard URL -> {"files", "rows", "kept"}
    uids: dict = field(default_factory=dict)
    removed_duplicates: int = 0                   # with --dedup: rows dedup removed that were otherwise eligible


def apply(files, resolved, out_dir, include_failed: bool = False, uids: bool = True,
          progress=None, dedup=None) -> FilterResult:
    """Stream every row once; write the kept rows to ``out_dir/kept/<score file name>``
    and, when the rows carry valid uids, ``out_dir/uids.npy`` (sorted, DataComp format).
    ``out_dir`` is a local folder or URL; uids are spilled to a local folder."""
    kept_dir = storage.join(out_dir, "kept")
    storage.makedirs(kept_dir)
    storage.remove_stale_temporaries(kept_dir)
    result = FilterResult()
    collector = UidCollector(spill_parent=None if storage.is_url(out_dir) else str(out_dir))
    malformed = missing = 0
    for path in files:
        target = storage.join(kept_dir, storage.basename(path))
        with named_errors(path):
            pf = parquet_file(path)
        kept_rows, start = (dedup.kept(path) if dedup else None), 0
        with pf, writing(target), storage.open_atomic(target) as fh:
            writer = pq.ParquetWriter(fh, pf.schema_arrow, compression="zstd")
            try:
                for batch in _named_batches(path, pf.iter_batches(batch_size=65_536)):
                    keep = _keep_mask(batch, resolved, include_failed, result, (kept_rows, start))
                    start += batch.num_rows
                    kept = batch.filter(pa.array(keep))
                    if kept.num_rows:   # no empty row groups: Hugging Face datasets cannot read them
                        writer.write_batch(kept)
                    _count_shards(batch, kept, storage.basename(path), result.shards)
                    if uids and kept.num_rows:
                        bad, absent = _collect_uids(kept, collector)
                        malformed, missing = malformed + bad, missing + absent
            finally:
                writer.close()
        if progress:
            progress()
    uids_path = storage.join(out_dir, "uids.npy")
    result.uids = {"written": 0, "malformed": malformed, "missing": missing, "path": None, "disabled": not uids}
    if collector.count:
        result.uids["written"] = collector.write(uids_path)
        result.uids["path"] = uids_path
    else:
        storage.remove(uids_path)   # never leave a stale list behind
    return result


def _named_batches(path, batches):
    """``batches`` with a failure to read them named as the score file's (:func:`named_errors`): only the
    reads, so that an error writing the output is not blamed on the input."""
    while True:
        with named_errors(path):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


@contextlib.contextmanager
def writing(target):
    """An ``OSError`` writing ``target`` (a full disk, a permission) as one line naming the output and what to
    do (the operating system's own reason, not a wrapper's), so that the input is not blamed; the error keeps
    its ``errno``."""
    try:
        yield
    except OSError as exc:
        if getattr(exc, "wclip_output", None) is not None:
            raise
        root = exc
        while isinstance(root.__cause__, OSError):
            root = root.__cause__
        reason = root.strerror or (str(root).strip().splitlines() or [type(root).__name__])[0]
        error = OSError(f"cannot write {target}: {reason}; free space there (or fix its permissions) or pass "
                        f"another --output, then rerun")
        error.errno, error.wclip_output = exc.errno, str(target)
        raise error from exc


def _collect_uids(kept, collector) -> tuple[int, int]:
    """Add the kept rows' well-formed uids; returns ``(malformed, missing)`` (no uid column: all missing)."""
    if "uid" not in kept.schema.names:
        return 0, kept.num_rows
    parsed, bad, absent = parse_uids(kept.column("uid"))
    collector.add(parsed)
    return bad, absent


def _keep_mask(batch, resolved, include_failed, result, dedup=(None, 0)) -> np.ndarray:
    n = batch.num_rows
    result.rows += n
    for item in pc.value_counts(pc.fill_null(batch.column("status"), "(null)")).to_pylist():
        result.status[item["values"]] += item["counts"]
    keep = eligible_rows(batch, include_failed, *dedup)
    if dedup[0] is not None:
        result.removed_duplicates += int(eligible_rows(batch, include_failed, None, 0).sum() - keep.sum())
    result.eligible += int(keep.sum())
    eligible = keep.copy()
    for r in resolved:
        column = r.condition.column
        groups = group_values(batch, r.by) if r.by else None
        hit = r.mask(float_values(batch, column), groups) if column in batch.schema.names \
            else np.zeros(n, bool)
        r.passed += int((hit & eligible).sum())
        keep &= hit
    for r in resolved:
        if r.by:
            kept_groups = r.balance.setdefault("kept", {})
            for g, count in zip(*np.unique(groups[keep], return_counts=True)):
                kept_groups[int(g)] = kept_groups.get(int(g), 0) + int(count)
    result.kept += int(keep.sum())
    return keep


def _count_shards(batch, kept, file_name, shards) -> None:
    for table, field_name in ((batch, "rows"), (kept, "kept")):
        if "shard" not in table.schema.names or not table.num_rows:
            continue
        for item in pc.value_counts(pc.fill_null(table.column("shard"), "")).to_pylist():
            entry = shards.setdefault(item["values"], {"files": [], "rows": 0, "kept": 0})
            if file_name not in entry["files"]:
                entry["files"].append(file_name)
            entry[field_name] += item["counts"]


def _checked_files(cfg: FilterConfig) -> tuple[list, object, bool]:
    """The score files, after refusing unreadable ones, mixed fits and unknown condition columns; what
    :func:`pipeline.scores.provenance.check_scores` found; whether the files have the local likelihood's columns."""
    from pipeline.scores.layout import list_score_files

    files = list_score_files(cfg.scores)
    if not files:
        raise ValueError(f"no score files (*.parquet) in {cfg.scores}; run `wclip score` first")
    check = check_scores(files)
    local = check_columns(files, cfg.conditions)
    if cfg.balance:
        check_columns(files, [Condition("min", cfg.balance, 0.0)])
        kind = file_schema(files[0]).field(cfg.balance).type
        if not pa.types.is_integer(kind):
            raise ValueError(f"--balance {cfg.balance}: a group column holds integers (image_cluster, "
                             f"text_cluster); it is {kind}")
    return files, check, local


def scored_shards(files) -> list:
    """The distinct values of the ``shard`` column over the score files, in file order."""
    seen: dict = {}
    for path in files:
        with named_errors(path):
            for batch in iter_batches(path, ["shard"]):
                seen.update(dict.fromkeys(v for v in pc.unique(batch.column("shard")).to_pylist() if v))
    return list(seen)


def check_inputs(inputs, files) -> dict:
    """Match ``--input`` to the scored shards before any work: none matching, or a matched local shard that
    does not exist, is an error. Returns counts for the report."""
    import os

    from pipeline.curate.reshard import match_inputs
    from pipeline.flow.read import shard_name

    shards = scored_shards(files)
    pairs, unmatched, _ = match_inputs(list(inputs), dict.fromkeys(shards))
    if not pairs:
        names = sorted({shard_name(v) for v in shards})
        shown = ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")
        raise ValueError(f"no --input shard matches a scored shard: the first, {inputs[0]} (shard name "
                         f"{shard_name(inputs[0])!r}), has no scores; the scores hold shards "
                         f"{shown or '(none)'}. Pass the shards that were scored")
    missing = [url for url, _ in pairs if "://" not in url and not url.startswith("pipe:") and not os.path.exists(url)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the --input shards do not exist: {', '.join(missing[:3])}")
    return {"given": len(inputs), "matched": len(pairs), "unmatched": len(unmatched),
            "unmatched_examples": unmatched[:5]}


def dry_run(cfg: FilterConfig) -> dict:
    """What :func:`run_filter` would read and write, after the same checks; reads footers (and with inputs
    the ``shard`` column), writes nothing and starts nothing."""
    files, check, _ = _checked_files(cfg)
    if cfg.dedup:
        DedupKept(cfg.dedup, files)
    out = str(cfg.output)
    kept_dir = storage.join(out, "kept")
    read = {"scores": str(cfg.scores), "score_files": len(files), "rows": check.rows,
            "conditions": [c.spec for c in cfg.conditions], "include_failed": cfg.include_failed,
            "inputs": check_inputs(cfg.inputs, files) if cfg.inputs else None}
    write = {"kept_dir": kept_dir, "kept": [storage.join(kept_dir, storage.basename(f)) for f in files],
             "uids": storage.join(out, "uids.npy") if cfg.uids else None,
             "filter_json": storage.join(out, "filter.json"),
             "shards_dir": storage.join(out, "shards") if cfg.inputs else None,
             "samples_per_shard": cfg.samples_per_shard if cfg.inputs else None}
    return {"dry_run": True, "read": read, "write": write, "warnings": check.warnings()}


def run_filter(cfg: FilterConfig, mapper=None) -> dict:
    """Resolve thresholds, write kept rows, uids and (with inputs) shards; returns ``filter.json``.

    ``mapper`` runs the resharding's copy tasks (needed with ``cfg.inputs``): ``mapper(fn, items, desc=,
    max_retries=, max_in_flight=, progress=)`` returns an outcome (``item``, ``ok``, ``error``) per item,
    as :meth:`pipeline.executors.Executor.map` does.
    """
    from pipeline import __version__

    started = time.time()
    if cfg.inputs and mapper is None:
        raise ValueError("writing shards (inputs given) needs a mapper to run the copy tasks, e.g. "
                         "the map of pipeline.executors.open_executor(cfg)")
    files, check, local = _checked_files(cfg)
    if cfg.inputs:
        check_inputs(cfg.inputs, files)
    dedup = DedupKept(cfg.dedup, files) if cfg.dedup else None
    resolved = resolve(files, cfg.conditions, cfg.include_failed, dedup=dedup, balance=cfg.balance,
                       alpha=cfg.balance_alpha)
    out = str(cfg.output)
    result = apply(files, resolved, out, cfg.include_failed, uids=cfg.uids, dedup=dedup)
    report = {
        "version": __version__, "scores": str(cfg.scores), "score_files": len(files),
        "provenance": {k: (check.provenance or {}).get(k) for k in ("stats_digest", "stats_path", "model",
                                                                     "normalize")} if check.provenance else None,
        "warnings": check.warnings(),
        "include_failed": cfg.include_failed, "rows": result.rows, "eligible": result.eligible,
        "kept": result.kept, "kept_fraction_of_rows": result.kept / result.rows if result.rows else None,
        "kept_fraction_of_eligible": result.kept / result.eligible if result.eligible else None,
        "status_counts": dict(result.status.most_common()),
        "conditions": [r.to_json(result.eligible) for r in resolved],
        "kept_dir": storage.join(out, "kept"), "uids": result.uids, "shards": None,
        "dedup": {"folder": dedup.folder, "removed_duplicates": result.removed_duplicates,
                  **{k: dedup.summary.get(k) for k in ("eps", "keep", "groups", "duplicates", "removed")}}
        if dedup else None,
    }
    if cfg.inputs:
        from pipeline.curate.reshard import write_shards

        report["shards"] = write_shards(
            list(cfg.inputs), result.shards, storage.join(out, "kept"), storage.join(out, "shards"), mapper,
            cfg.samples_per_shard, cfg.samples_per_task, cfg.max_in_flight, cfg.retries, cfg.progress, local=local,
            input_format=cfg.input_format)
    report["elapsed_s"] = round(time.time() - started, 3)
    storage.write_json(storage.join(out, "filter.json"), report, sort_keys=False)
    return report
