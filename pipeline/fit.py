"""The fit job: whitening statistics of a reference corpus, for both towers, merged exactly in shard order."""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections import Counter
from typing import Optional

import numpy as np

import pipeline
from pipeline.config import FitConfig
from pipeline.errors import ConfigError
from pipeline.executors import open_executor
from pipeline.flow.batch import TOWERS
from pipeline.flow.read import check_unique_names
from pipeline.models import embed_dim, model_identity
from pipeline.scores.sinks import FitSink
from pipeline.whitening import Moments, StatsFile, WhiteningStats
from pipeline.whitening.moments import HashSample, held_out, key_hashes

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


class ReferenceAccumulator:
    """The fit's collector (:class:`pipeline.executors.Collector`): merges shard results in input order (so
    the reference set, and the file, do not depend on timing), splitting each row into the fit or the
    held-out set by a hash of its key; with ``--clusters``, it also keeps the fit rows whose key hashes are
    smallest (:class:`~pipeline.whitening.moments.HashSample`) for the clusters."""

    def __init__(self, cfg: FitConfig):
        self.cfg = cfg
        self.moments: dict = {}
        self.heldout: dict = {t: [] for t in TOWERS}
        self.cluster_rows: dict = {}  # tower -> HashSample of fit rows, with --clusters K > 1
        self.buffer: dict = {}
        self.next_index = 0
        self.samples = 0
        self.used_shards: list = []
        self.status = Counter()

    @property
    def stop(self) -> bool:
        """Enough reference samples: start no more shards."""
        return self.cfg.max_samples is not None and self.samples >= self.cfg.max_samples

    def add(self, index: int, url: str, result: dict) -> None:
        self.buffer[index] = (url, result)
        while self.next_index in self.buffer and not self.stop:
            url, res = self.buffer.pop(self.next_index)
            self._merge(url, res)
            self.next_index += 1

    def failed(self, index: int, url: str) -> None:
        """A shard that failed: later shards may merge past it."""
        self.add(index, None, None)

    def _merge(self, url, res) -> None:
        if res is None:
            return
        keys, _ = res["towers"]["image"]
        take = len(keys)
        if self.cfg.max_samples is not None:
            take = min(take, self.cfg.max_samples - self.samples)
        if take <= 0:
            return
        self.used_shards.append(url)
        self.status.update(res["summary"]["status_counts"])
        for tower in TOWERS:
            tkeys, emb = res["towers"][tower]
            tkeys, emb = tkeys[:take], emb[:take].astype(np.float64)
            if not len(tkeys):
                continue
            hashes = key_hashes(tkeys, self.cfg.seed)
            mask = held_out(hashes, self.cfg.holdout)
            if tower not in self.moments:
                self.moments[tower] = Moments.empty(emb.shape[1])
            self.moments[tower].update(emb[~mask])
            self.heldout[tower].append(emb[mask])
            if (self.cfg.clusters or 1) > 1:
                self.cluster_rows.setdefault(tower, HashSample(self.cfg.cluster_sample, emb.shape[1])).add(
                    hashes[~mask], emb[~mask])
        self.samples += take


def fit(cfg: FitConfig) -> dict:
    """Run the fit job and write the stats file; returns a summary dict."""
    run = cfg.run
    check_unique_names(run.shards)
    check_request(cfg, width=embed_dim(run.model.name, run.model.cache_dir), rows=cfg.max_samples,
                  rows_from=f"--max-samples {cfg.max_samples}")
    identity = model_identity(run.model)  # fails early on an unreadable checkpoint
    acc = ReferenceAccumulator(cfg)
    with open_executor(run) as jobs:
        encoders = jobs.start_encoders(run)
        info = jobs.encoder_info(run, encoders)
        log.info("encoders: %s on %s (%s)", encoders.describe(), info["device"], info["precision"])
        report = jobs.run_shards(run, list(run.shards), encoders, FitSink(), collector=acc)
    if acc.samples == 0:
        raise ValueError("no usable reference samples: every sample failed or the shards are empty; "
                         "check the inputs with `wclip score` or the shard paths")
    towers = {}
    for tower in TOWERS:
        if tower not in acc.moments:
            raise ValueError(f"no usable {tower} embeddings in the reference shards")
        parts = [h for h in acc.heldout[tower] if len(h)]
        heldout = np.concatenate(parts) if parts else None
        sample = acc.cluster_rows.get(tower)
        towers[tower] = WhiteningStats.from_moments(acc.moments[tower], heldout=heldout,
                                                    components=cfg.components, shrinkage=cfg.shrinkage,
                                                    seed=cfg.seed, clusters=cfg.clusters,
                                                    fit_sample=None if sample is None else sample.rows)
    metadata = {
        "model": run.model.name, "pretrained": run.model.pretrained,
        "checkpoint_sha256": identity["weights"].split("sha256:")[-1] if run.model.checkpoint else None,
        "random_init_seed": run.model.seed if run.model.random_init else None,
        "model_identity": identity, "normalize": run.encode.normalize, "precision": info["precision"],
        "decode": run.inputs.decode,
        "components_requested": cfg.components, "shrinkage": cfg.shrinkage, "holdout": cfg.holdout,
        "clusters": cfg.clusters, "cluster_sample": cfg.cluster_sample if cfg.clusters else None,
        "seed": cfg.seed, "n_reference": acc.samples,
        "n_heldout": {t: towers[t].n_heldout for t in TOWERS},
        "components": {t: towers[t].components for t in TOWERS},
        "reference_shards": len(acc.used_shards), "reference_digest": shards_digest(acc.used_shards),
        "max_samples": cfg.max_samples, "wclip_version": pipeline.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    for tower, ws in towers.items():
        for line in ws.clusters.warnings(tower) if ws.clusters is not None else ():
            log.warning(line)
    StatsFile(towers=towers, metadata=metadata).save(cfg.output)
    summary = report.summary()
    summary.update(reference_samples=acc.samples, stats=str(cfg.output),
                   towers={t: {k: v for k, v in towers[t].summary().items() if not isinstance(v, dict)}
                           for t in TOWERS})
    return summary
