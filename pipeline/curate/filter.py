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

Memory: thresholds come from :class:`pipeline.curate.select.RadixSelect` (exact, a few streaming
passes); rows are streamed in Parquet batches; uids are spilled in sorted runs.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import FilterConfig
from pipeline.curate.select import RadixSelect
from pipeline.curate.uids import UidCollector, parse_uids
from pipeline.table import SCORE_COLUMNS, file_columns, float_values, iter_batches, ok_mask

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

    def mask(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            hit = values >= self.threshold if self.op == ">=" else values <= self.threshold
        return hit & np.isfinite(values)

    def to_json(self, eligible: int) -> dict:
        c = self.condition
        return {"kind": c.kind, "column": c.column, "value": c.value, "keep": c.keep or None,
                "spec": c.spec, "op": self.op, "threshold": _num(self.threshold),
                "ranked": self.ranked, "rank": self.rank, "passed": self.passed,
                "passed_fraction": self.passed / eligible if eligible else None}


def _num(x):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def check_columns(files, conditions) -> None:
    """Raise ValueError when a condition names a column no score file has, or a text column."""
    present = set()
    for f in files[:1] + files[-1:]:
        present.update(file_columns(f))
    for c in conditions:
        if c.column not in present:
            raise ValueError(f"no column {c.column!r} in the scores; score columns are "
                             f"{', '.join(SCORE_COLUMNS)}")
        schema = pq.ParquetFile(files[0]).schema_arrow
        if c.column in schema.names:
            kind = schema.field(c.column).type
            if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
                raise ValueError(f"column {c.column!r} is {kind}, not a number")


def resolve(files, conditions, include_failed: bool = False, progress=None) -> list[Resolved]:
    """Turn conditions into thresholds; fractions take a few streaming passes (exact)."""
    resolved, selectors = [], {}
    for i, c in enumerate(conditions):
        if c.kind == "fraction":
            selectors[i] = RadixSelect(c.value)
            resolved.append(Resolved(c, ">=" if c.keep == "highest" else "<=", math.nan))
        else:
            resolved.append(Resolved(c, ">=" if c.kind == "min" else "<=", c.value))
    columns = sorted({conditions[i].column for i in selectors})
    while any(not s.done for s in selectors.values()):
        for path in files:
            for batch in iter_batches(path, ["status", *columns]):
                eligible = np.ones(batch.num_rows, bool) if include_failed else ok_mask(batch)
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
    kept_files: list = field(default_factory=list)
    uids: dict = field(default_factory=dict)


def apply(files, resolved, out_dir, include_failed: bool = False, uids: bool = True,
          progress=None) -> FilterResult:
    """Stream every row once; write the kept rows to ``out_dir/kept/<score file name>``
    and, when the rows carry valid uids, ``out_dir/uids.npy`` (sorted, DataComp format)."""
    out_dir = Path(out_dir)
    (out_dir / "kept").mkdir(parents=True, exist_ok=True)
    result = FilterResult()
    collector, malformed, missing = UidCollector(spill_parent=out_dir), 0, 0
    for path in files:
        target = out_dir / "kept" / path.name
        tmp = target.with_name(f".{target.name}.tmp")
        pf = pq.ParquetFile(path)
        writer = pq.ParquetWriter(tmp, pf.schema_arrow, compression="zstd")
        try:
            for batch in pf.iter_batches(batch_size=65_536):
                keep = _keep_mask(batch, resolved, include_failed, result)
                kept = batch.filter(pa.array(keep))
                writer.write_batch(kept)
                _count_shards(batch, kept, path.name, result.shards)
                if uids and "uid" in batch.schema.names and kept.num_rows:
                    parsed, bad, absent = parse_uids(kept.column("uid"))
                    collector.add(parsed)
                    malformed, missing = malformed + bad, missing + absent
        finally:
            writer.close()
        os.replace(tmp, target)
        result.kept_files.append(str(target))
        if progress:
            progress()
    result.uids = {"written": 0, "malformed": malformed, "missing": missing, "path": None}
    if collector.count:
        result.uids["written"] = collector.write(out_dir / "uids.npy")
        result.uids["path"] = str(out_dir / "uids.npy")
    else:
        (out_dir / "uids.npy").unlink(missing_ok=True)   # never leave a stale list behind
    return result


def _keep_mask(batch, resolved, include_failed, result) -> np.ndarray:
    n = batch.num_rows
    result.rows += n
    for item in pc.value_counts(pc.fill_null(batch.column("status"), "(null)")).to_pylist():
        result.status[item["values"]] += item["counts"]
    keep = np.ones(n, bool) if include_failed else ok_mask(batch)
    result.eligible += int(keep.sum())
    eligible = keep.copy()
    for r in resolved:
        column = r.condition.column
        hit = r.mask(float_values(batch, column)) if column in batch.schema.names \
            else np.zeros(n, bool)
        r.passed += int((hit & eligible).sum())
        keep &= hit
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


def run_filter(cfg: FilterConfig) -> dict:
    """Resolve thresholds, write kept rows, uids and (with inputs) shards; returns ``filter.json``."""
    import json
    import time

    from pipeline import __version__
    from pipeline.table import list_score_files

    started = time.time()
    files = list_score_files(cfg.scores)
    if not files:
        raise ValueError(f"no score files (*.parquet) in {cfg.scores}; run `wclip score` first")
    check_columns(files, cfg.conditions)
    resolved = resolve(files, cfg.conditions, cfg.include_failed)
    out = Path(cfg.output)
    result = apply(files, resolved, out, cfg.include_failed, uids=cfg.uids)
    report = {
        "version": __version__, "scores": str(cfg.scores), "score_files": len(files),
        "include_failed": cfg.include_failed, "rows": result.rows, "eligible": result.eligible,
        "kept": result.kept, "kept_fraction_of_rows": result.kept / result.rows if result.rows else None,
        "kept_fraction_of_eligible": result.kept / result.eligible if result.eligible else None,
        "status_counts": dict(result.status.most_common()),
        "conditions": [r.to_json(result.eligible) for r in resolved],
        "kept_dir": str(out / "kept"), "uids": result.uids, "shards": None,
    }
    if cfg.inputs:
        from pipeline.curate.reshard import write_shards

        report["shards"] = write_shards(
            list(cfg.inputs), result.shards, out / "kept", out / "shards", cfg.samples_per_shard,
            cfg.samples_per_task, cfg.ray, cfg.max_in_flight, cfg.retries, cfg.progress)
    report["elapsed_s"] = round(time.time() - started, 3)
    tmp = out / ".filter.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "filter.json")
    return report


def format_report(report: dict) -> str:
    """Human summary of a ``filter.json`` report."""
    rows, eligible = report["rows"], report["eligible"]
    pct = lambda a, b: f"{100 * a / b:6.2f}%" if b else "   n/a"  # noqa: E731
    lines = [f"{rows} rows in {report['score_files']} score files; {eligible} eligible "
             f"({'all rows' if report['include_failed'] else 'status ok'})"]
    for c in report["conditions"]:
        rank = f" (k={c['rank']} of {c['ranked']})" if c["kind"] == "fraction" else ""
        lines.append(f"  {c['column']} {c['op']} {c['threshold']}: {c['passed']} of {eligible} "
                     f"{pct(c['passed'], eligible)}  [{c['spec']}{rank}]")
    lines.append(f"kept {report['kept']} rows: {pct(report['kept'], rows).strip()} of all, "
                 f"{pct(report['kept'], eligible).strip()} of eligible -> {report['kept_dir']}")
    u = report["uids"]
    if u.get("path"):
        lines.append(f"uids: {u['written']} written to {u['path']}"
                     + (f"; {u['malformed']} malformed skipped" if u["malformed"] else "")
                     + (f"; {u['missing']} rows without uid" if u["missing"] else ""))
    elif u.get("malformed"):
        lines.append(f"uids: none written; {u['malformed']} malformed skipped")
    s = report.get("shards")
    if s:
        lines.append(f"shards: {s['finished']} of {s['shards']} finished in {s['dir']} "
                     f"({s['samples']} samples, {s['samples_per_shard']} per shard; "
                     f"{s['tasks_run']} of {s['tasks']} copy tasks run)")
        if s["inputs_unmatched"]:
            lines.append(f"  {s['inputs_unmatched']} input shards have no scores, e.g. "
                         f"{s['unmatched_examples'][:2]}")
        if s["kept_not_in_inputs"]:
            lines.append(f"  {s['kept_not_in_inputs']} kept rows come from scored shards not in --input")
        for f in s["failed"]:
            lines.append(f"  FAILED {f.get('inputs') or f.get('shard')}: {f['error'].splitlines()[0]}")
    return "\n".join(lines)
