"""The encoding stage as one object: a CLIP model on one device plus the whitening scorer, turning a
:class:`~pipeline.flow.batch.Chunk` into a :class:`~pipeline.flow.batch.ChunkResult`; and the shard body,
written once (:func:`assemble_shard`). The executors (:mod:`pipeline.executors`) run the stage in an encoder
actor (GPUs) or inside each reader task (CPU-only: :func:`encode_shard`); it knows nothing about Ray."""

from __future__ import annotations

import logging

from pipeline.flow.assemble import ShardAssembler
from pipeline.flow.batch import Chunk, ChunkResult, read_chunks
from pipeline.flow.encode import Encoder
from pipeline.flow.formats import open_reader
from pipeline.flow.preprocess import Preprocessor
from pipeline.flow.whiten import ChunkScorer

_CACHE: dict = {}  # one stage per worker process and job: reader tasks of a job reuse the loaded model


class EncodeStage:
    """One CLIP model on one device (a GPU, or this process's CPU threads) and the job's stats."""

    def __init__(self, spec, encode_cfg, stats=None):
        logging.getLogger().setLevel(logging.WARNING)
        self.encoder = Encoder(spec, encode_cfg)
        self.scorer = ChunkScorer(stats, self.encoder.device)

    @classmethod
    def cached(cls, token: str, spec, encode_cfg, stats=None) -> "EncodeStage":
        """The stage of job ``token`` in this process, built on first use (earlier jobs' stages dropped)."""
        if token not in _CACHE:
            _CACHE.clear()
            _CACHE[token] = cls(spec, encode_cfg, stats)
        return _CACHE[token]

    def transforms(self):
        return self.encoder.preprocess, self.encoder.tokenizer

    def info(self) -> dict:
        """Device, precision, embedding sizes and what ``--decode gpu`` needs, for the job's checks."""
        import torch

        enc = self.encoder
        size = getattr(enc.model.visual, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        with torch.inference_mode():
            dims = {"image": int(enc.model.encode_image(torch.zeros(1, 3, *size, device=enc.device)).shape[1]),
                    "text": int(enc.model.encode_text(torch.zeros(
                        1, int(enc.model.context_length or 77), dtype=torch.long, device=enc.device)).shape[1])}
        return {"device": str(enc.device), "precision": enc.precision, "dims": dims,
                "preprocess_split": enc.preprocessor.split,
                "device_decode_unsupported": enc.device_decode_unsupported}

    def process(self, chunk: Chunk, keep_embeddings: bool = False) -> ChunkResult:
        return self.scorer.score(chunk, self.encoder.encode(chunk), keep_embeddings)

    def encode_chunks(self, chunks, keep_embeddings: bool = False):
        """``(prepared, chunk, ChunkResult)`` of each of ``chunks``' pairs, encoded here, in order."""
        for prepared, chunk in chunks:
            yield prepared, chunk, self.process(chunk, keep_embeddings)


def shard_chunks(url: str, run, transforms):
    """``(reader, chunks)`` of one shard: the reader (its ``damage`` once read) and its
    ``(prepared samples, Chunk)`` pairs, preprocessed with ``transforms`` = (preprocess, tokenizer)."""
    preprocess, tokenizer = transforms
    reader = open_reader(url, run.inputs)
    return reader, read_chunks(url, run.inputs, Preprocessor(preprocess), tokenizer, run.chunk_size, reader)


def _no_report(samples: int) -> None:
    pass


def assemble_shard(url: str, run, transforms, encode, sink, report=_no_report):
    """The shard body of every executor: read shard ``url`` (preprocessed with ``transforms``), have
    ``encode(chunks, keep_embeddings)`` yield ``(prepared, chunk, ChunkResult)`` for its chunks in order,
    assemble exactly one row per sample read, and hand the shard to ``sink.finish``. Only ``encode`` differs:
    a stage in this process (:func:`encode_shard`) or encoder actors (:mod:`pipeline.executors.ray`).
    ``report(samples)`` after each chunk: the rows assembled so far (a :class:`pipeline.progress.TaskReport`
    that the executor carries to the progress bar)."""
    assembler = ShardAssembler(url)
    reader, chunks = shard_chunks(url, run, transforms)
    for prepared, chunk, result in encode(chunks, sink.keep_embeddings):
        assembler.add(prepared, chunk, result)
        report(len(assembler.rows))
    return sink.finish(assembler, reader.damage)


def encode_shard(url: str, run, stage: EncodeStage, sink, report=_no_report):
    """Read one shard, encode and score it with ``stage`` in this process, and hand the assembled shard to
    ``sink.finish`` (what a reader task does on CPU-only machines, under either executor); ``report`` as
    in :func:`assemble_shard`."""
    return assemble_shard(url, run, stage.transforms(), stage.encode_chunks, sink, report)
