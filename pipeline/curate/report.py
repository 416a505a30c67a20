"""Human summaries of ``wclip filter``: the report of a run (``filter.json``) and the plan of a dry run,
printed on stderr one line per fact; long lists (unreadable samples) are capped with a count."""

from __future__ import annotations

SHOWN = 20  # unreadable samples listed one per line on the console; filter.json lists more
IMG2DATASET_UID = ("img2dataset records a uid only when run with --save_additional_columns '[\"uid\"]' "
                   "(DataComp's download script passes it); download with it and rescore to get uids.npy")


def _pct(a, b) -> str:
    return f"{100 * a / b:6.2f}%" if b else "   n/a"


def format_report(report: dict) -> str:
    """Human summary of a ``filter.json`` report."""
    rows, eligible = report["rows"], report["eligible"]
    lines = [f"{rows} rows in {report['score_files']} score files; {eligible} eligible "
             f"({'all rows' if report['include_failed'] else 'status ok'})"]
    lines += [f"warning: {w}" for w in report.get("warnings") or []]
    for c in report["conditions"]:
        rank = f" (k={c['rank']} of {c['ranked']})" if c["kind"] == "fraction" else ""
        lines.append(f"  {c['column']} {c['op']} {c['threshold']}: {c['passed']} of {eligible} "
                     f"{_pct(c['passed'], eligible)}  [{c['spec']}{rank}]")
    lines.append(f"kept {report['kept']} rows: {_pct(report['kept'], rows).strip()} of all, "
                 f"{_pct(report['kept'], eligible).strip()} of eligible -> {report['kept_dir']}")
    lines += uid_lines(report["uids"], report["kept"])
    if report.get("shards"):
        lines += shard_lines(report["shards"])
    return "\n".join(lines)


def uid_lines(u: dict, kept: int) -> list:
    if u.get("path"):
        return [f"uids: {u['written']} written to {u['path']}"
                + (f"; {u['malformed']} malformed skipped" if u["malformed"] else "")
                + (f"; {u['missing']} rows without uid" if u["missing"] else "")]
    if u.get("disabled") or not kept:
        return []
    if u.get("malformed"):
        return [f"uids: uids.npy not written: none of the {kept} kept rows has a well-formed uid "
                f"({u['malformed']} malformed, {u['missing']} missing)"]
    return [f"uids: uids.npy not written: the {kept} kept rows have no uid; {IMG2DATASET_UID}"]


def shard_lines(s: dict) -> list:
    lines = [f"shards: {s['finished']} of {s['shards']} finished in {s['dir']} "
             f"({s['samples']} kept rows, {s.get('copied', s['samples'])} samples copied, "
             f"{s['samples_per_shard']} rows per shard; {s['tasks_run']} of {s['tasks']} copy tasks run)"]
    if s["inputs_unmatched"]:
        lines.append(f"  {s['inputs_unmatched']} input shards have no scores, e.g. {s['unmatched_examples'][:2]}")
    if s["kept_not_in_inputs"]:
        lines.append(f"  {s['kept_not_in_inputs']} kept rows come from scored shards not in --input")
    count, listed = s.get("unreadable_count", 0), s.get("unreadable") or []
    if count:
        lines.append(f"  {count} kept samples could not be read and were not copied (their rows in the shards' "
                     f"Parquet say why: status failed_to_download); listed in filter.json:")
        lines += [f"    unreadable: {u['shard']} key {u['key']!r}: {u['reason']}" for u in listed[:SHOWN]]
        if count > SHOWN:
            lines.append(f"    ... and {count - SHOWN} more")
    for f in s["failed"]:
        lines.append(f"  FAILED {f.get('inputs') or f.get('shard')}: {f['error'].splitlines()[0]}")
    return lines


def format_plan(plan: dict) -> str:
    """Human summary of :func:`pipeline.curate.filter.dry_run`'s plan."""
    read, write = plan["read"], plan["write"]
    lines = ["dry run: nothing is written, no Ray is started",
             f"would read {read['score_files']} score files ({read['rows']} rows) in {read['scores']}"]
    lines += [f"warning: {w}" for w in plan.get("warnings") or []]
    lines += [f"  condition: {c}" for c in read["conditions"]] or ["  no conditions: every eligible row is kept"]
    if read.get("inputs"):
        i = read["inputs"]
        lines.append(f"would read {i['matched']} of {i['given']} --input shards (matched to scored shards)"
                     + (f"; {i['unmatched']} have no scores, e.g. {i['unmatched_examples'][:2]}" if i["unmatched"]
                        else ""))
    lines.append(f"would write {len(write['kept'])} kept-row files in {write['kept_dir']}, e.g. {write['kept'][:2]}")
    lines += [f"would write {write[k]}" for k in ("uids", "filter_json") if write.get(k)]
    if write.get("shards_dir"):
        lines.append(f"would write shards in {write['shards_dir']} (NNNNN.tar, NNNNN.parquet, NNNNN_stats.json; "
                     f"{write['samples_per_shard']} kept rows each; how many depends on the selection)")
    return "\n".join(lines)
