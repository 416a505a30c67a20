"""Job configuration: small frozen dataclasses, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from pipeline.decode import InputConfig
from pipeline.encode import EncodeConfig
from pipeline.models import ModelSpec


def _positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class RayOptions:
    """Where the job runs."""

    address: Optional[str] = None  # Ray cluster address; None: RAY_ADDRESS if set, else a private local Ray
    num_cpus: Optional[int] = None  # local Ray only: CPUs to use (default: all)
    num_gpus: Optional[int] = None  # local Ray only: GPUs to use (default: all)

    def __post_init__(self):
        _positive("num_cpus", self.num_cpus, allow_none=True)
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")


@dataclass(frozen=True)
class RunConfig:
    """What every streaming job shares: inputs, model, encoders and execution."""

    shards: tuple  # shard URLs (already expanded)
    model: ModelSpec
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    inputs: InputConfig = field(default_factory=InputConfig)
    ray: RayOptions = field(default_factory=RayOptions)
    chunk_size: int = 256  # samples per message from a reader task to an encoder actor
    max_in_flight: Optional[int] = None  # shards being read at once (default: CPUs available)
    encoders: Optional[int] = None  # encoder actors (default: one per GPU, else one)
    retries: int = 2  # extra attempts for a failed shard before it is recorded as failed
    progress: Optional[bool] = None  # progress bar (None: when stderr is a terminal)

    def __post_init__(self):
        if not self.shards:
            raise ValueError("no input shards given")
        _positive("chunk_size", self.chunk_size)
        _positive("max_in_flight", self.max_in_flight, allow_none=True)
        _positive("encoders", self.encoders, allow_none=True)
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")


@dataclass(frozen=True)
class ScoreConfig:
    """``wclip score``: per-shard Parquet scores under ``output``."""

    run: RunConfig
    stats_path: str
    output: str
    overwrite: bool = False  # redo shards that already have a completion marker
    save_embeddings: bool = False  # also write row-aligned embeddings per shard (safetensors)


@dataclass(frozen=True)
class FitConfig:
    """``wclip fit``: whitening statistics of a reference corpus."""

    run: RunConfig
    output: str
    components: Union[None, int, str] = "auto"  # kept components m: None (all), an int, or "auto"
    shrinkage: float = 0.0  # S + a * trace(S)/d * I
    holdout: float = 0.1  # fraction held out (by key hash) for calibration
    max_samples: Optional[int] = None  # cap on reference samples (first shards first)
    seed: int = 0  # seed of the held-out hash

    def __post_init__(self):
        if not (0.0 <= self.holdout < 1.0):
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if not (0.0 <= self.shrinkage < 1.0):
            raise ValueError(f"shrinkage must be in [0, 1), got {self.shrinkage}")
        _positive("max_samples", self.max_samples, allow_none=True)
        if isinstance(self.components, str) and self.components != "auto":
            raise ValueError(f"components must be None, a positive integer or 'auto', got {self.components!r}")
        if isinstance(self.components, int):
            _positive("components", self.components)
