"""What a job reads, behind one contract: :class:`~pipeline.sources.tars.TarSource` (WebDataset tar shards,
img2dataset ``files`` folders, image Parquet: images a model encodes) and
:class:`~pipeline.sources.embeddings.EmbeddingsSource` (precomputed embeddings: clip-retrieval folders, DataComp
``.npz``). The jobs of :mod:`pipeline.runs` are written once over it.

A source has units (a shard, an embedding file), each one task and one output, named by ``names`` in input
order (``name_of(url)`` for a unit's URL), described by ``label``/``units``, and:

- ``check_score(cfg, stats)``: refuse stats this source cannot be scored with (ConfigError, one line);
  ``provenance(cfg, stats)``: what makes its scores; ``needs_embeddings(cfg)``: whether a done unit without
  saved embeddings is redone; ``score(executor, cfg, stats, todo, made, skipped)``: run the units ``todo`` on
  the executor, each writing its outputs, and return the :class:`~pipeline.executors.JobReport`.
- ``check_fit(cfg, check_request)``: refuse a fit that cannot end in a stats file; ``fit_plan(cfg)``: what
  ``--dry-run`` says; ``collect(executor, cfg, ref)``: merge each unit's
  :class:`~pipeline.runs.reference.ReferencePart` into the :class:`~pipeline.runs.reference.Reference` in input
  order, returning ``(summary, the stats metadata fields of this source)``; ``towers(ref)``; ``no_rows``: the
  error when no row was usable.
"""

from __future__ import annotations


def source_for(cfg, stats=None):
    """The source a fit or score configuration reads (``stats``: the stats a score run uses)."""
    from pipeline.config import EmbeddingRunConfig
    from pipeline.sources.embeddings import EmbeddingsSource
    from pipeline.sources.tars import TarSource

    if not isinstance(cfg.run, EmbeddingRunConfig):
        return TarSource(cfg.run)
    return EmbeddingsSource.to_fit(cfg.run) if stats is None else EmbeddingsSource.to_score(cfg.run, stats)
