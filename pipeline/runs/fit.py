"""The fit job, written once over a source (:mod:`pipeline.sources`): whitening statistics of a reference
corpus, each unit's reference part merged exactly in input order (:mod:`pipeline.runs.reference`); a fit on
part of its input (a unit failed) writes no stats file."""

from __future__ import annotations

import datetime
import hashlib
import logging
from typing import Optional

import pipeline
from pipeline.errors import ConfigError
from pipeline.executors import open_executor
from pipeline.runs.reference import Reference
from pipeline.sources import source_for
from pipeline.whitening import StatsFile
from pipeline.whitening.clusters import AutoClusters

log = logging.getLogger("wclip")


def check_request(cfg, width: Optional[int] = None, rows: Optional[int] = None, rows_from: str = "") -> None:
    """Refuse, before any encoding or reading, a fit that cannot end in a stats file: ``--components`` above
    the embeddings' ``width`` (when known), ``--holdout 0`` where held-out rows are needed (``--components
    auto`` chooses by them, ``--clusters`` its shrinkage and calibration), and ``--clusters`` above the ``rows``
    the reference can have (when known; ``rows_from`` says how that is known). ``cfg``: a
    :class:`~pipeline.config.FitConfig` or :class:`~pipeline.config.EmbeddingFitConfig`."""
    components, clusters = cfg.components, cfg.clusters or 1
    if isinstance(components, int) and width is not None and components > width:
        raise ConfigError(f"--components {components}: the embeddings are {width}-d, so at most {width} components "
                          f"can be kept: give --components {width} or fewer (or 'all')")
    needs = [why for why, needed in (("--components auto chooses the components by them", components == "auto"),
                                     (f"--clusters {clusters} chooses its shrinkage by them", clusters > 1)) if needed]
    if cfg.holdout == 0 and needs:
        raise ConfigError(f"--holdout 0 holds no reference rows out, but {' and '.join(needs)}: give --holdout > 0 "
                          f"(e.g. 0.1)" + (", or a fixed --components" if components == "auto" else ""))
    if clusters > 1 and rows is not None and clusters > rows:
        raise ConfigError(f"cannot make {clusters} clusters of at most {rows} reference rows ({rows_from}): pass "
                          f"fewer --clusters or more reference rows")


def shards_digest(urls) -> str:
    """sha256 of the shard URL list (order-independent)."""
    return hashlib.sha256("\n".join(sorted(urls)).encode()).hexdigest()


def fit(cfg, dry_run: bool = False) -> dict:
    """Run ``wclip fit`` (``cfg``: a :class:`~pipeline.config.FitConfig` or
    :class:`~pipeline.config.EmbeddingFitConfig`) and write the stats file; returns a summary dict (or, with
    ``dry_run``, the plan). When a unit fails, no stats file is written: the summary says which
    (``not_written``)."""
    source = source_for(cfg)
    source.check_fit(cfg, check_request)
    if dry_run:
        return source.fit_plan(cfg)
    ref = Reference(cfg)
    with open_executor(cfg.run) as executor:
        summary, fields = source.collect(executor, cfg, ref)
    if ref.failed:  # stats of the other units would not be the fit asked for
        return {**summary, "failed": ref.failed, "stats": None,
                "not_written": f"{len(ref.failed)} of {len(source.names)} {source.units} failed"}
    if ref.usable == 0:
        raise ValueError(source.no_rows)
    towers = ref.whiten(source.towers(ref), source.units)
    write_stats(cfg, towers, ref, fields)
    summary.update(reference_samples=ref.usable, stats=str(cfg.output),
                   towers={t: {k: v for k, v in ws.summary().items() if not isinstance(v, dict)}
                           for t, ws in towers.items()})
    if "l2_normalized" in fields.get("embeddings", {}):
        summary["normalized"] = fields["embeddings"]["l2_normalized"]
    return summary


def write_stats(cfg, towers: dict, ref: Reference, fields: dict) -> None:
    """The stats file of ``towers``: the source's ``fields`` and the fit's own metadata; the clusters'
    warnings logged."""
    metadata = {
        **fields,
        "components_requested": cfg.components, "shrinkage": cfg.shrinkage, "holdout": cfg.holdout,
        "clusters": "auto" if isinstance(cfg.clusters, AutoClusters) else cfg.clusters,  # (AUTO is an int)
        "cluster_sample": cfg.cluster_sample if cfg.clusters else None,
        "seed": cfg.seed, "n_reference": ref.usable, "max_heldout": cfg.max_heldout,
        "n_heldout": {t: ws.n_heldout for t, ws in towers.items()},
        "components": {t: ws.components for t, ws in towers.items()},
        "reference_shards": len(ref.used), "reference_digest": shards_digest(ref.used),
        "max_samples": cfg.max_samples, "wclip_version": pipeline.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    for tower, ws in towers.items():
        for line in ws.clusters.warnings(tower) if ws.clusters is not None else ():
            log.warning(line)
    StatsFile(towers=towers, metadata=metadata).save(cfg.output)
