"""The card's duplicates section: what ``wclip dedup`` found (eps, the rule, groups and their sizes, rows
removed, a strip of the largest group's members) and, when the filter balanced its fractions, each cluster's
quota and kept share. The dedup folder is the one ``wclip filter --dedup`` recorded in ``filter.json``."""

from __future__ import annotations

from pipeline import storage
from pipeline.card.markdown import code
from pipeline.scores.dedup import settings_path
from pipeline.scores.layout import list_score_files
from pipeline.scores.table import read_columns

MEMBERS_SHOWN = 8  # images in the strip of one group


def duplicates_section(filter_dir, out: str, inputs=(), thumbnails: bool = True) -> dict | None:
    """``card.json``'s ``duplicates`` (None when the filter used no dedup folder and balanced nothing)."""
    if not filter_dir or not storage.exists(storage.join(filter_dir, "filter.json")):
        return None
    report = storage.read_json(storage.join(filter_dir, "filter.json"))
    balance = [dict(c["balance"], condition=c["spec"]) for c in report.get("conditions") or [] if c.get("balance")]
    dedup = report.get("dedup")
    if not dedup and not balance:
        return None
    section = {"balance": balance, "dedup": None}
    if dedup:
        made = storage.read_json(settings_path(dedup["folder"]))
        summary = made.get("summary") or {}
        section["dedup"] = {k: summary.get(k) for k in ("eps", "keep", "clusters_source", "clusters", "rows",
                                                         "compared", "pairs", "groups", "duplicates", "removed",
                                                         "group_sizes")}
        section["dedup"].update(folder=dedup["folder"], removed_by_filter=dedup.get("removed_duplicates"))
        section["dedup"]["example"], section["plot"] = _example(dedup["folder"], out, inputs, thumbnails)
    return section


def _largest_group(folder) -> list:
    """The members (key, shard, index, kept) of the largest duplicate group (ties: the smallest group id)."""
    best, members = None, []
    for path in list_score_files(folder):
        table = read_columns(path, ["key", "shard", "index", "dup_group", "dup_size", "kept"])
        for row in table.filter(table.column("dup_size").fill_null(0).to_numpy() > 1).to_pylist():
            rank = (-row["dup_size"], row["dup_group"])
            if best is None or rank < best:
                best, members = rank, []
            if rank == best:
                members.append(row)
    return members


def _example(folder, out: str, inputs, thumbnails: bool) -> tuple:
    from pipeline.card.plots import strip
    from pipeline.card.plots import thumbnails as read_thumbnails

    members = _largest_group(folder)[:MEMBERS_SHOWN]
    if not members:
        return [], None
    thumbs = read_thumbnails(members, tuple(inputs))[0] if thumbnails else [None] * len(members)
    rows = [(float(m["index"]), {"caption": ("kept: " if m["kept"] else "removed: ") + str(m["key"])})
            for m in members]
    plot = strip(out, "duplicates.png", f"A duplicate group of {members[0]['dup_size']} rows (value: index in "
                 f"its shard)", rows, thumbs)
    return members, plot


def duplicates_lines(section: dict | None, _table, _pct) -> list:
    """The README's lines for :func:`duplicates_section`, drawn with the README's ``_table`` and ``_pct``."""
    if not section:
        return []
    out = ["## Duplicates and balance", ""]
    d = section.get("dedup")
    if d:
        out += [f"`wclip dedup` ({code(d['folder'])}): rows whose image embeddings have cosine >= 1 - eps = "
                f"{1 - d['eps']:g} within a cluster ({d['clusters']} clusters from {d['clusters_source']}) are "
                f"duplicates; each group keeps one row by `{d['keep']}`. {d['compared']:,} of {d['rows']:,} rows "
                f"were compared; {d['groups']:,} groups hold {d['duplicates']:,} rows and {d['removed']:,} rows "
                f"({_pct(d['removed'], d['rows'])}) were removed as duplicates.", ""]
        sizes = sorted((d.get("group_sizes") or {}).items(), key=lambda kv: int(kv[0]))  # JSON keys are strings
        out += _table(["group size", "groups"], [[s, n] for s, n in sizes])
        if d.get("example"):
            out += ["The largest group:", ""]
            out += _table(["key", "shard", "index", "kept"],
                          [[m["key"], m["shard"], m["index"], "yes" if m["kept"] else "no"] for m in d["example"]])
        if section.get("plot"):
            out += [f"![A duplicate group]({section['plot']})", ""]
    for b in section.get("balance") or []:
        out += [f"`{b['condition']}` was split between the groups of `{b['column']}` in proportion to their "
                f"size to the power {b.get('alpha', 'alpha')} (quota per group, then its best rows):", ""]
        kept = b.get("kept") or {}
        out += _table(["group", "eligible rows", "quota", "kept", "kept share"],
                      [[g, v["rows"], v["quota"], kept.get(g, 0), _pct(kept.get(g, 0), v["rows"])]
                       for g, v in (b.get("groups") or {}).items()])
    return out
