"""Precomputed embeddings in: vectors users already have (clip-retrieval / LAION folders, DataComp ``.npz``
shards, found and read by :mod:`pipeline.sources.vectors`). No model is loaded and no encoder started: each
file is one task of :mod:`pipeline.sources.vector_tasks`, run on the executor's threads or, on a cluster, as
Ray tasks; one file is one unit of work and of output (:mod:`pipeline.sources` states the contract).

Fit and score are the jobs of :mod:`pipeline.runs`, with every rule of a scores folder
(:mod:`pipeline.scores`). The "model" of precomputed vectors is their source
(``embeddings:clip-retrieval``, ``embeddings:datacomp-l14``, ...), recorded at fit time and compared at score
time like a model identity, unless the user names the model that made them (``--embeddings-model``,
:class:`pipeline.models.DeclaredModel`): scoring then takes a fit of that model, on its tar shards or on its
declared embeddings, and refuses any other; fitting records it as the stats' model identity.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import pipeline
from pipeline.errors import ConfigError
from pipeline.executors import JobReport, summary_rows, uses_ray
from pipeline.models import (
    CHECKPOINT_WEIGHTS,
    HUB_WEIGHTS,
    PRETRAINED_WEIGHTS,
    RANDOM_WEIGHTS,
    DeclaredModel,
    declare,
    embed_dim,
)
from pipeline.scores.sinks import ScoreSink
from pipeline.sources.vector_tasks import FitFile, ScoreFile, TowerScorer, fit_file, score_file, warm_up
from pipeline.sources.vectors import NORM_STATE, array_name, discover, open_array, probe, unit_norms
from pipeline.storage import exists, sha256

log = logging.getLogger("wclip")

BATCH_PER_SLOT = 2  # fit: files per task slot merged at a time (bounds the driver's memory)


def _normalized(norms: dict):
    """L2-normalised vectors (every norm within 1e-2 of 1), from ``{tower: [min, max]}``."""
    return all(unit_norms(lo, hi) for lo, hi in norms.values())


def _describe_kind(identity: dict) -> str:
    return f"{identity.get('model')} ({identity.get('weights')})"


def vouched_model(meta: dict) -> Optional[dict]:
    """The model identity stats stand for: the model a tar fit ran, or the one ``wclip fit --embeddings
    --embeddings-model`` declared; None for stats of precomputed vectors of a model not declared."""
    emb = meta.get("embeddings")
    if not emb:
        return meta.get("model_identity") or {}
    return meta.get("model_identity") if emb.get("model") else None


def _fitted_source(meta: dict) -> dict:
    """The kind of precomputed vectors stats were fitted on (:meth:`EmbeddingSource.identity`)."""
    return meta["embeddings"].get("source") or meta.get("model_identity") or {}


# -- score ------------------------------------------------------------------------------------------------
def check_kind(stats, source, first: dict, declared: Optional[DeclaredModel] = None) -> None:
    """Refuse stats fitted on another kind of vectors: without ``declared`` (``--embeddings-model``) another
    source or DataComp key, or a model's tar shards; with it, a fit of another model (or of precomputed vectors
    of a model not declared); and always another width or the other normalisation. ``first`` is :func:`probe`
    of the first file."""
    meta = stats.metadata
    if declared is not None:
        _check_declared(meta, declared)
    elif not meta.get("embeddings"):
        fitted = meta.get("model_identity") or {}
        raise ConfigError(f"the stats were fitted on tar shards with model {_describe_kind(fitted)}, not on "
                          f"precomputed embeddings: if that model made these, say so with --embeddings-model "
                          f"{declare(fitted)}; else fit stats on them with `wclip fit --embeddings PATHS`")
    elif _fitted_source(meta) != source.identity():
        vouched = vouched_model(meta)
        raise ConfigError(f"embedding kind mismatch: the stats were fitted on {_fitted_source(meta).get('model')} "
                          f"vectors, but these inputs are {source.identity()['model']}; fit stats on them with "
                          f"`wclip fit --embeddings`" + (" (or pass the fit's --embedding-key)" if source.key else "")
                          + (f", or, if the fit's model made them, say so with --embeddings-model {declare(vouched)}"
                             if vouched else ""))
    on_tars = not meta.get("embeddings")
    for tower, ws in stats.towers.items():
        got = first.get(tower)
        if got and got["dim"] != ws.dim:
            raise ConfigError(f"the {tower} embeddings are {got['dim']}-d but the stats were fitted on {ws.dim}-d "
                              f"ones: " + (f"{declared.text} did not make them (wrong --embeddings-model, embeddings "
                                           f"or stats file)" if declared else "wrong embeddings or stats file"))
        if got and got["normalized"] is not None and got["normalized"] != bool(meta.get("normalize")):
            fix = (f"refit on the images with {'--normalize' if got['normalized'] else '--raw'}, as these are"
                   if on_tars else "wrong embeddings or stats file")
            raise ConfigError(f"the stats were fitted on {NORM_STATE[bool(meta.get('normalize'))]} vectors, but these "
                              f"{tower} embeddings are {NORM_STATE[got['normalized']]}: {fix}")
    if not set(stats.towers) & set(source.towers):
        raise ConfigError(f"the inputs have {', '.join(source.towers)} embeddings and the stats "
                          f"{', '.join(stats.towers)}: nothing to score")


def _check_declared(meta: dict, declared: DeclaredModel) -> None:
    """Refuse a fit that is not of the model ``--embeddings-model`` declares."""
    vouched = vouched_model(meta)
    if vouched is None:
        raise ConfigError(f"--embeddings-model {declared.text}: the stats were fitted on precomputed "
                          f"{_fitted_source(meta).get('model')} vectors of a model not declared, so no model can be "
                          f"checked: drop --embeddings-model, or refit with `wclip fit --embeddings PATHS "
                          f"--embeddings-model {declared.text}`")
    if not declared.matches(vouched):
        said = f"{declared.model} ({declared.weights or 'any weights of the repository'})"
        raise ConfigError(f"model mismatch: the stats were fitted with model {_describe_kind(vouched)}, but "
                          f"--embeddings-model says {said} made these embeddings: score embeddings of the fit's "
                          f"model (--embeddings-model {declare(vouched)}), or fit on ones of this model")


def scored_model(meta: dict, source) -> dict:
    """The model identity a scores folder records: the source of the vectors (:meth:`EmbeddingSource.identity`),
    and the model that made them when the stats stand for one (:func:`vouched_model`)."""
    vouched = vouched_model(meta)
    if vouched is None:
        return source.identity()
    return {"model": vouched.get("model"), "weights": vouched.get("weights"), "source": source.identity()["model"]}


def _discover(run, fit_key: Optional[str]):
    """The inputs of a score run: DataComp arrays default to the fit's ``--embedding-key``; inputs of another
    kind than the fit's, a clip-retrieval folder (which has no key), are found as they are and then checked
    (:func:`check_kind`)."""
    if run.key or not fit_key:
        return discover(run.paths, run.key)
    try:
        return discover(run.paths, fit_key)
    except ConfigError as exc:
        try:
            return discover(run.paths, None)
        except ConfigError:
            raise exc from None  # DataComp shards need a key: the first error is about them


# -- fit --------------------------------------------------------------------------------------------------
def _header_rows(file) -> int:
    """Rows of a file's first array, from its header."""
    _, url, member = file.towers[0]
    with open_array(url, member) as reader:
        return reader.rows


def _row_limits(files: list, max_samples) -> list:
    """``[(file, rows or None)]``: with ``max_samples``, the first rows of the first files (headers only)."""
    if max_samples is None:
        return [(f, None) for f in files]
    out, left = [], max_samples
    for f in files:
        rows = _header_rows(f)
        out.append((f, min(rows, left)))
        left -= min(rows, left)
        if left <= 0:
            break
    return out


def _fit_widths(source, declared: Optional[DeclaredModel]) -> dict:
    """``{tower: (width, whose)}`` every file of a fit must have (:func:`read_blocks`' ``widths``): the first
    file's, from its headers; with ``--embeddings-model``, refused here unless they are that model's width."""
    dims = {}
    for tower, url, member in source.files[0].towers:
        with open_array(url, member) as reader:
            dims[tower] = (reader.dim, array_name(url, member))
    made = embed_dim(declared.model) if declared is not None else None
    if made is None:
        return {t: (dim, f"{where} (the first file) holds") for t, (dim, where) in dims.items()}
    for tower, (dim, where) in dims.items():
        if dim != made:
            raise ConfigError(f"--embeddings-model {declared.text}: that model makes {made}-d embeddings, but "
                              f"{where} holds {dim}-d {tower} embeddings: name the model that made them, or leave "
                              f"--embeddings-model out")
    return {t: (made, f"--embeddings-model {declared.text} makes") for t in dims}


def _known_rows(files: list, max_samples, need: int) -> tuple:
    """``(rows, how known)``: at most how many rows the reference holds, for ``--clusters`` ``need``, read from
    headers only until ``need`` rows are found (a large corpus costs one header); ``(None, "")`` for no need."""
    if need <= 1:
        return None, ""
    total = 0
    for f in files:
        total += _header_rows(f)
        if total >= need:
            break
    if max_samples is not None and max_samples < total:
        return max_samples, f"--max-samples {max_samples}"
    return total, "counted from the embedding files' headers"


def _odd_normalisation(states: list) -> list:
    """Failure records of the files whose normalisation is not the first file's: one reference is of one kind."""
    if not states:
        return []
    first, normalized = states[0]
    return [{"shard": url, "error": f"its embeddings are {NORM_STATE[state]}, but those of {first} (the first "
                                    f"file) are {NORM_STATE[normalized]}: a file of another kind among the inputs"}
            for url, state in states[1:] if state != normalized]


def _weight_fields(weights: str) -> dict:
    """The stats metadata's ``pretrained``, ``checkpoint_sha256`` and ``random_init_seed``, as a tar fit writes
    them, for a declared model's weights (all None for precomputed vectors of a model not declared)."""
    def after(prefix):
        return weights[len(prefix):] if weights.startswith(prefix) else None

    seed = after(RANDOM_WEIGHTS)
    return {"pretrained": after(PRETRAINED_WEIGHTS), "checkpoint_sha256": after(CHECKPOINT_WEIGHTS),
            "random_init_seed": int(seed) if seed is not None else None}


def _with_saved_model(run, files):
    """``run``, declaring the model that made ``files`` when wclip saved them all with one model and the user
    named none (``--embeddings-model`` wins): saved embeddings score with the stats that made them, as they are."""
    made = files.saved_model
    if run.model is not None or made is None:
        return run
    model = DeclaredModel(declare(made), made["model"], made["weights"])
    log.info("the embeddings were saved by `wclip score --save-embeddings` with model %s: read as "
             "--embeddings-model %s", _describe_kind(made), model.text)
    return dataclasses.replace(run, model=model)


class EmbeddingsSource:
    """Precomputed embedding files named by a job's :class:`~pipeline.config.EmbeddingRunConfig`, found as
    :func:`~pipeline.sources.vectors.discover` finds them (``files``: an :class:`EmbeddingSource`)."""

    units = "embedding files"

    def __init__(self, run, files):
        self.run, self.files = _with_saved_model(run, files), files
        self.label = f"{files.label} embedding files"
        self._by_url = {f.url: f.name for f in files.files}

    @classmethod
    def to_score(cls, run, stats) -> "EmbeddingsSource":
        """The inputs of a score run (DataComp arrays default to the fit's ``--embedding-key``)."""
        return cls(run, _discover(run, (stats.metadata.get("embeddings") or {}).get("key")))

    @classmethod
    def to_fit(cls, run) -> "EmbeddingsSource":
        return cls(run, discover(run.paths, run.key))

    @property
    def names(self) -> list:
        return [f.name for f in self.files.files]

    def name_of(self, url: str) -> str:
        return self._by_url.get(url, url)

    # -- score ------------------------------------------------------------------------------------------
    def check_score(self, cfg, stats) -> None:
        """Refuse stats of another kind, then make each tower's scorer on the run's device and backend (a
        device or backend that cannot be had is refused here, before any work)."""
        check_kind(stats, self.files, probe(self.files.files[0]), self.run.model)
        run = self.run
        if run.device != "cpu" and uses_ray(run):
            raise ConfigError(f"--device {run.device} scores embeddings in this machine's threads (--executor local); "
                              f"on Ray they are scored on the CPU: leave --device out there")
        self.scorers = {t: TowerScorer.of(ws, run.device, run.backend) for t, ws in stats.towers.items()
                        if t in self.files.towers}

    def provenance(self, cfg, stats) -> dict:
        made = {"stats_digest": sha256(cfg.stats_path), "stats_path": str(cfg.stats_path),
                "model": scored_model(stats.metadata, self.files), "normalize": bool(stats.metadata.get("normalize")),
                "wclip_version": pipeline.__version__}
        if self.run.model is not None:
            made["embeddings_model"] = self.run.model.text  # as declared (--embeddings-model)
        return made

    def needs_embeddings(self, cfg) -> bool:
        return False  # the embeddings are the input

    def score(self, executor, cfg, stats, todo: list, made: dict, skipped: int) -> JobReport:
        """Score the files named ``todo`` as tasks on ``executor``, each writing its outputs and marker."""
        todo = set(todo)
        sink = ScoreSink(cfg.output, provenance=made)
        tasks = [ScoreFile(file=f, kind=self.files.kind, stats=self.scorers, sink=sink, block_rows=self.run.block_rows,
                           normalized=bool(stats.metadata.get("normalize")))
                 for f in self.files.files if f.name in todo]
        warm_up()
        started = time.time()
        outcomes = executor.map(score_file, tasks, "score", samples=summary_rows)
        report = JobReport(skipped=skipped, elapsed=time.time() - started)
        for o in outcomes:
            if o.ok:
                report.add(o.result)
            else:
                report.failed.append((o.item.file.url, o.error))
        return report

    # -- fit --------------------------------------------------------------------------------------------
    def check_fit(self, cfg, check_request) -> None:
        run = self.run
        if run.model is not None and run.model.weights is None:
            raise ConfigError(f"--embeddings-model {run.model.text}: its weights are not in the Hugging Face cache "
                              f"here, so the fit cannot record which they are: name them as {run.model.model}@"
                              f"{HUB_WEIGHTS}HEX (their sha256), or fit where they are cached")
        self.widths = _fit_widths(self.files, run.model)
        rows, rows_from = _known_rows(list(self.files.files), cfg.max_samples, cfg.clusters or 0)
        check_request(cfg, width=min(w for w, _ in self.widths.values()), rows=rows, rows_from=rows_from)
        self.limits = _row_limits(list(self.files.files), cfg.max_samples)

    def fit_plan(self, cfg) -> dict:
        return {"dry_run": True, "inputs": len(self.files.files), "input_kind": self.label, "to_do": len(self.limits),
                "rows": sum(r for _, r in self.limits) if cfg.max_samples else None,
                "output": str(cfg.output), "replaces": exists(str(cfg.output))}

    def collect(self, executor, cfg, ref) -> tuple:
        """Read the files' reference parts as tasks, merged into ``ref`` in file order, a few batches of files
        at a time (bounding the driver's memory); returns ``(summary, the stats metadata this source records)``."""
        max_sample = cfg.cluster_sample if (cfg.clusters or 1) > 1 else 0
        tasks = [FitFile(file=f, kind=self.files.kind, holdout=cfg.holdout, seed=cfg.seed,
                         max_heldout=cfg.max_heldout, rows=rows, block_rows=self.run.block_rows,
                         max_sample=max_sample, widths=self.widths) for f, rows in self.limits]
        started, states, size = time.time(), [], BATCH_PER_SLOT * executor.slots
        for first in range(0, len(tasks), size):
            batch = tasks[first:first + size]
            desc = f"fit {first + 1}-{first + len(batch)} of {len(tasks)}" if len(tasks) > size else "fit"
            for o in executor.map(fit_file, batch, desc, samples=summary_rows):
                if not o.ok:
                    ref.failed.append({"shard": o.item.file.url, "error": o.error})
                    continue
                done = o.result["summary"]
                ref.add(o.item.file.url, o.result["part"], done["rows"], done["usable"])
                if done["usable"]:
                    states.append((o.item.file.url, _normalized(o.result["part"].norms)))
        elapsed = time.time() - started
        ref.failed.extend(_odd_normalisation(states))
        counts = {k: v for k, v in (("encode", ref.rows - ref.usable), ("ok", ref.usable)) if v}
        summary = {"rows": ref.rows, "status_counts": counts, "shards_done": len(ref.used), "shards_skipped": 0,
                   "failed": ref.failed, "damaged": [], "elapsed_s": round(elapsed, 2),
                   "samples_per_s": round(ref.rows / elapsed, 1) if elapsed > 0 else None}
        return summary, self._fields(cfg, ref.total.norms)

    def _fields(self, cfg, norms: dict) -> dict:
        """What the stats metadata records of these vectors and the model that made them (if declared)."""
        run, files = self.run, self.files
        normalize = _normalized(norms)
        identity = run.model.identity() if run.model else files.identity()
        return {"model": identity["model"], **_weight_fields(identity["weights"]), "model_identity": identity,
                "normalize": normalize, "precision": "precomputed", "decode": None,
                "embeddings": {"kind": files.kind, "key": files.key, "label": files.label, "l2_normalized": normalize,
                               "norms": {t: list(v) for t, v in norms.items()}, "source": files.identity(),
                               "model": run.model.text if run.model else None}}

    def towers(self, ref) -> tuple:
        return tuple(ref.total.moments)

    no_rows = ("no usable reference rows: every embedding is NaN/inf, the files are empty, or every file failed; "
               "check the --embeddings paths")
