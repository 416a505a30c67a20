"""Images in: WebDataset tar shards, img2dataset ``files`` folders and image Parquet (read by
:mod:`pipeline.flow.read` and :mod:`pipeline.flow.formats`), encoded by a model on the executor's encoders.
One shard is one unit of work and of output; :mod:`pipeline.sources` states the contract this implements."""

from __future__ import annotations

import logging

import pipeline
from pipeline.errors import ConfigError
from pipeline.executors import JobReport
from pipeline.flow.batch import TOWERS
from pipeline.flow.read import check_unique_names, shard_name
from pipeline.models import embed_dim, model_identity
from pipeline.scores.sinks import FitSink, ScoreSink
from pipeline.storage import exists, sha256
from pipeline.whitening.moments import key_hashes

log = logging.getLogger("wclip")


class TarSource:
    """Tar shards (or image files / Parquet) named by a job's :class:`~pipeline.config.RunConfig`."""

    units = "shards"

    def __init__(self, run):
        self.run = run
        self.urls = list(run.shards)
        self.label = "shards"

    @property
    def names(self) -> list:
        return [shard_name(u) for u in self.urls]

    def name_of(self, url: str) -> str:
        return shard_name(url)

    # -- score ------------------------------------------------------------------------------------------
    def check_score(self, cfg, stats) -> None:
        check_unique_names(self.urls)
        check_model_matches(stats, self.run)

    def provenance(self, cfg, stats) -> dict:
        """What makes this run's scores: the stats (by digest), the model identity and the normalisation."""
        return {"stats_digest": sha256(cfg.stats_path), "stats_path": str(cfg.stats_path),
                "model": model_identity(self.run.model), "normalize": self.run.encode.normalize,
                "wclip_version": pipeline.__version__}

    def needs_embeddings(self, cfg) -> bool:
        return cfg.save_embeddings

    def score(self, executor, cfg, stats, todo: list, made: dict, skipped: int) -> JobReport:
        """Score the shards named ``todo`` on ``executor``'s encoders, writing each with its marker."""
        run, todo = self.run, set(todo)
        encoders = executor.start_encoders(run, stats)
        info = executor.encoder_info(run, encoders)
        for tower, ws in stats.towers.items():
            if info["dims"][tower] != ws.dim:
                raise ConfigError(f"the {tower} tower gives {info['dims'][tower]}-d embeddings but the stats "
                                  f"were fitted on {ws.dim}-d ones: wrong model or stats file")
        log.info("encoders: %s on %s (%s)", encoders.describe(), info["device"], info["precision"])
        sink = ScoreSink(cfg.output, provenance=made, keep_embeddings=cfg.save_embeddings,
                         dims={t: ws.dim for t, ws in stats.towers.items()}, local=stats.clustered)
        urls = [u for u in self.urls if shard_name(u) in todo]
        return executor.run_shards(run, urls, encoders, sink, skipped=skipped)

    # -- fit --------------------------------------------------------------------------------------------
    def check_fit(self, cfg, check_request) -> None:
        check_unique_names(self.urls)
        check_request(cfg, width=embed_dim(self.run.model.name, self.run.model.cache_dir), rows=cfg.max_samples,
                      rows_from=f"--max-samples {cfg.max_samples}")
        self._identity = model_identity(self.run.model)  # fails early on an unreadable checkpoint

    def fit_plan(self, cfg) -> dict:
        return {"dry_run": True, "inputs": len(self.urls), "input_kind": "shards", "to_do": len(self.urls),
                "output": str(cfg.output), "replaces": exists(str(cfg.output)), "model": self.run.model.name}

    def collect(self, executor, cfg, ref) -> tuple:
        """Encode the shards and merge their reference rows into ``ref`` in shard order, up to
        ``--max-samples``; returns ``(summary, the stats metadata this source records)``."""
        run = self.run
        encoders = executor.start_encoders(run)
        info = executor.encoder_info(run, encoders)
        log.info("encoders: %s on %s (%s)", encoders.describe(), info["device"], info["precision"])
        parts = ShardParts(ref, cfg.seed, cfg.max_samples)
        report = executor.run_shards(run, self.urls, encoders, FitSink(), collector=parts)
        errors = dict(report.failed)
        ref.failed = [{"shard": u, "error": errors.get(u, "failed")} for u in parts.failed_urls]
        model = run.model
        fields = {"model": model.name, "pretrained": model.pretrained,
                  "checkpoint_sha256": self._identity["weights"].split("sha256:")[-1] if model.checkpoint else None,
                  "random_init_seed": model.seed if model.random_init else None, "model_identity": self._identity,
                  "normalize": run.encode.normalize, "precision": info["precision"], "decode": run.inputs.decode}
        return report.summary(), fields

    def towers(self, ref) -> tuple:
        return TOWERS

    no_rows = ("no usable reference samples: every sample failed or the shards are empty; check the inputs with "
               "`wclip score` or the shard paths")


class ShardParts:
    """The tar fit's collector (:class:`pipeline.executors.Collector`): each shard's usable rows become a
    :class:`~pipeline.runs.reference.ReferencePart` merged into the reference in shard order (so the reference,
    and the stats file, do not depend on timing), truncated at ``--max-samples`` in input order. A failed shard
    the fit would have used is recorded (``failed_urls``): the fit then writes no stats."""

    def __init__(self, ref, seed: int, max_samples):
        self.ref, self.seed, self.max_samples = ref, seed, max_samples
        self.buffer: dict = {}
        self.next_index = 0
        self.failed_urls: list = []

    @property
    def stop(self) -> bool:
        """Enough reference samples: start no more shards."""
        return self.max_samples is not None and self.ref.usable >= self.max_samples

    def add(self, index: int, url: str, result) -> None:
        self.buffer[index] = (url, result)
        while self.next_index in self.buffer and not self.stop:
            url, res = self.buffer.pop(self.next_index)
            self._merge(url, res)
            self.next_index += 1

    def failed(self, index: int, url: str) -> None:
        self.add(index, url, None)

    def _merge(self, url: str, res) -> None:
        if res is None:
            self.failed_urls.append(url)
            return
        keys, _ = res["towers"]["image"]
        take = len(keys) if self.max_samples is None else min(len(keys), self.max_samples - self.ref.usable)
        if take <= 0:
            return
        part = self.ref.new_part()
        for tower in TOWERS:
            tkeys, emb = res["towers"][tower]
            if len(tkeys[:take]):
                part.add(tower, key_hashes(tkeys[:take], self.seed), emb[:take])
        self.ref.add(url, part, take, take)


def check_model_matches(stats, run) -> None:
    """Refuse to score with a model or normalisation other than the fit's."""
    meta = stats.metadata
    refuse_embedding_stats(meta)
    fitted = meta.get("model_identity")
    wanted = model_identity(run.model)
    if fitted is None:
        raise ConfigError("the stats file records no model identity; re-run `wclip fit` with this version")
    if fitted != wanted:
        raise ConfigError(
            f"model mismatch: the stats were fitted with model {fitted['model']!r} ({fitted['weights']}), "
            f"but scoring would use {wanted['model']!r} ({wanted['weights']}). Score with the fit's model "
            f"(omit --model to use it) or re-run `wclip fit` with this model.")
    if bool(meta.get("normalize")) != run.encode.normalize:
        raise ConfigError(
            f"normalisation mismatch: the stats were fitted on "
            f"{'L2-normalised' if meta.get('normalize') else 'raw'} embeddings, but scoring would use "
            f"{'L2-normalised' if run.encode.normalize else 'raw'} ones; drop --normalize/--raw to use the fit's")


def refuse_embedding_stats(meta: dict) -> None:
    """Stats fitted on precomputed embeddings score embeddings only (``wclip score --embeddings``), unless the fit
    declared the model that made them (``--embeddings-model``): then they score that model's shards like a fit on
    tars (the model identity is checked as for any fit)."""
    if meta.get("embeddings") and not meta["embeddings"].get("model"):
        raise ConfigError(f"the stats were fitted on precomputed embeddings ({meta['model_identity']['model']}): score "
                          f"that kind of embeddings with `wclip score --embeddings PATHS`, or fit on these shards "
                          f"with `wclip fit --input`")
