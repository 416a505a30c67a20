"""The typed hand-off between the stages: a :class:`Chunk` of model inputs goes from a reader to an
encoder, a :class:`ChunkResult` (one :class:`TowerResult` per tower) comes back. Building chunks from
prepared samples lives here too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from pipeline.config import InputConfig
from pipeline.flow.decode import prepare_sample
from pipeline.flow.formats import open_reader
from pipeline.flow.preprocess import Preprocessor

TOWERS = ("image", "text")


@dataclass
class Chunk:
    """Model inputs of ``n`` consecutive samples of one shard (what an encoder receives)."""

    n: int  # samples in the chunk (rows, whether or not they have inputs)
    image_rows: np.ndarray  # int32 rows with an image input: those with ``pixels`` first, then ``jpegs``
    text_rows: np.ndarray  # int32 rows with a caption
    pixels: Optional[np.ndarray] = None  # preprocessed images (uint8, or float32 when not split)
    jpegs: Optional[list] = None  # encoded JPEGs the encoder decodes on its device (``decode="gpu"``)
    tokens: Optional[np.ndarray] = None  # int64 token ids, one row per ``text_rows`` entry

    def rows(self, tower: str) -> np.ndarray:
        return self.image_rows if tower == "image" else self.text_rows


@dataclass
class TowerResult:
    """One tower's answer for a chunk; every array is aligned with the chunk's rows for that tower."""

    error: Optional[str] = None  # the tower failed for the whole chunk (each of its rows gets it)
    decode_errors: dict = field(default_factory=dict)  # position -> message, JPEGs the device could not decode
    finite: Optional[np.ndarray] = None  # bool: the embedding is finite
    sqnorm: Optional[np.ndarray] = None  # float64 whitened squared norms (NaN: no embedding)
    loglik: Optional[np.ndarray] = None
    pvalue: Optional[np.ndarray] = None
    cluster: Optional[np.ndarray] = None  # the local likelihood (stats with clusters): most likely cluster,
    local_loglik: Optional[np.ndarray] = None  # float64 mixture log-likelihood,
    local_pvalue: Optional[np.ndarray] = None  # its p-value in that cluster
    embeddings: Optional[np.ndarray] = None  # float32 (rows, d), only when asked for (NaN: no embedding)


@dataclass
class ChunkResult:
    """The encoder's answer for a chunk."""

    image: TowerResult
    text: TowerResult
    clip_score: np.ndarray  # float64, one per chunk row (NaN where a row lacks either embedding)

    def tower(self, name: str) -> TowerResult:
        return self.image if name == "image" else self.text


def build_chunk(prepared: list, tokenizer) -> Chunk:
    """Stack the model inputs of some prepared samples into a :class:`Chunk`."""
    pixel_rows = [i for i, p in enumerate(prepared) if p.pixels is not None]
    jpeg_rows = [i for i, p in enumerate(prepared) if p.pixels is None and p.jpeg is not None]
    text_rows = [i for i, p in enumerate(prepared) if p.caption is not None]
    chunk = Chunk(n=len(prepared),
                  image_rows=np.asarray(pixel_rows + jpeg_rows, dtype=np.int32),
                  text_rows=np.asarray(text_rows, dtype=np.int32),
                  pixels=np.stack([prepared[i].pixels for i in pixel_rows]) if pixel_rows else None,
                  jpegs=[prepared[i].jpeg for i in jpeg_rows] if jpeg_rows else None)
    if text_rows:
        tokens = tokenizer([prepared[i].caption for i in text_rows])
        chunk.tokens = np.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens, dtype=np.int64)
    return chunk


def read_chunks(url: str, inputs: InputConfig, preprocessor: Preprocessor, tokenizer,
                chunk_size: int, reader=None) -> Iterator[tuple]:
    """Yield ``(prepared_samples, chunk)`` pairs for a shard, ``chunk_size`` samples at a time."""
    reader = reader or open_reader(url, inputs)
    batch: list = []
    for sample in reader:
        batch.append(prepare_sample(sample, url, inputs, preprocessor))
        if len(batch) >= chunk_size:
            yield batch, build_chunk(batch, tokenizer)
            batch = []
    if batch:
        yield batch, build_chunk(batch, tokenizer)
