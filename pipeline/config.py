"""Every job's configuration: small frozen dataclasses validated at construction, naming the field and the
bad value. The command line reads its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from pipeline.models import DeclaredModel, ModelSpec

DECODE_PLACES = ("cpu", "gpu")  # where JPEGs are decoded
INPUT_FORMATS = ("webdataset", "files", "parquet")  # tars; img2dataset's folders; image bytes in Parquet
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # encoder precision choices
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image member extensions, first present wins
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
MAX_MEMBER_BYTES = 64 << 20  # a tar member larger than this is not read (its sample gets an error)
STALL_TIMEOUT = 120.0  # seconds without a byte from a remote or piped shard before it counts as stalled
MAX_ASPECT_RATIO = 50.0  # longer side / shorter side; CLIP's resize of a thinner image would be huge
CLUSTER_SAMPLE = 50_000  # fit rows (per tower) the local likelihood's clusters are found and fitted on
MAX_HELDOUT = 50_000  # held-out rows (per tower) a fit keeps for calibration: those with the smallest key hashes


def _non_negative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


EXECUTORS = ("auto", "local", "ray")  # --executor: where work runs (pipeline.executors)


def _check_executor(name: str) -> None:
    if name not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {name!r}")


def _positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class InputConfig:
    """Which tar members hold what, and the limits applied while decoding."""

    image_exts: tuple = IMAGE_EXTS  # first present wins
    caption_exts: tuple = ("txt",)  # first present wins
    meta_ext: str = "json"  # img2dataset metadata (url, uid, ...)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # width*height above this is refused as a decompression bomb
    max_caption_chars: int = 10_000  # longer captions are cut (the tokenizer keeps its context length anyway)
    decode: str = "cpu"  # where JPEGs are decoded: "cpu" (reader tasks, PIL) or "gpu" (encoder actor, on its device)
    max_member_bytes: int = MAX_MEMBER_BYTES  # a tar member larger than this is not read (its sample gets an error)
    max_aspect_ratio: float = MAX_ASPECT_RATIO  # images thinner than 1:this are refused before resizing
    stall_timeout: float = STALL_TIMEOUT  # seconds without a byte from a remote/piped shard: a failed read
    input_format: str = "webdataset"  # webdataset tars, img2dataset "files" folders, or "parquet" image bytes
    jpeg_draft: bool = True  # decode JPEGs at the smallest DCT scale that still covers CLIP's input size

    def __post_init__(self):
        if not self.image_exts or not self.caption_exts:
            raise ValueError("image_exts and caption_exts must each name at least one member extension")
        for name in ("max_image_pixels", "max_member_bytes", "max_aspect_ratio", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {self.input_format!r}")
        if self.decode not in DECODE_PLACES:
            raise ValueError(f"decode must be one of {DECODE_PLACES}, got {self.decode!r}")


@dataclass(frozen=True)
class EncodeConfig:
    """How the towers run."""

    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    precision: str = "auto"  # "auto" = bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16 / fp16
    batch_size: int = 256  # samples per forward pass
    normalize: bool = False  # L2-normalise embeddings before whitening (must match the fit)
    channels_last: bool = True  # NHWC memory format for conv stems on CUDA
    compile: bool = False  # torch.compile the towers (slow first batch, faster after)
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


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
    executor: str = "auto"  # EXECUTORS (pipeline.executors): "local" (worker processes, no Ray), "ray", or "auto"

    def __post_init__(self):
        if not self.shards:
            raise ValueError("no input shards given")
        _check_executor(self.executor)
        _positive("chunk_size", self.chunk_size)
        _positive("max_in_flight", self.max_in_flight, allow_none=True)
        _positive("encoders", self.encoders, allow_none=True)
        _non_negative("retries", self.retries)


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
    clusters: Union[None, int, str] = None  # K for the local likelihood (pipeline.whitening.clusters), or "auto"
    #                                         (K chosen on held-out rows; held as clusters.AUTO); None: global only
    max_heldout: int = MAX_HELDOUT  # held-out rows kept for calibration: those with the smallest key hashes
    cluster_sample: int = CLUSTER_SAMPLE  # fit rows the clusters are found on: those with the smallest key hashes

    def __post_init__(self):
        if isinstance(self.clusters, str) and self.clusters == "auto":
            from pipeline.whitening.clusters import AUTO  # an int (2) to every check of a cluster count below

            object.__setattr__(self, "clusters", AUTO)
        _positive("clusters", self.clusters, allow_none=True)
        _positive("cluster_sample", self.cluster_sample)
        if self.clusters and self.clusters > self.cluster_sample:
            raise ValueError(f"--clusters {self.clusters} needs at least as many sampled fit rows: raise "
                             f"--cluster-sample (now {self.cluster_sample}) or ask for fewer clusters")
        if not (0.0 <= self.holdout < 1.0):
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if not (0.0 <= self.shrinkage < 1.0):
            raise ValueError(f"shrinkage must be in [0, 1), got {self.shrinkage}")
        _positive("max_samples", self.max_samples, allow_none=True)
        _positive("max_heldout", self.max_heldout)
        if isinstance(self.components, str) and self.components != "auto":
            raise ValueError(f"components must be None, a positive integer or 'auto', got {self.components!r}")
        if isinstance(self.components, int):
            _positive("components", self.components)


@dataclass(frozen=True)
class FilterConfig:
    """Everything ``wclip filter`` needs."""

    scores: str                       # scores folder (``*.parquet``)
    output: str                       # output folder
    conditions: tuple = ()            # Condition objects, all must pass
    include_failed: bool = False      # rows whose status is not "ok" are eligible too
    inputs: tuple = ()                # input shard URLs (expanded): write new shards when given
    input_format: str = "webdataset"  # the inputs' layout: tars, img2dataset's files folders, image Parquet
    samples_per_shard: int = 10_000   # samples per output shard
    samples_per_task: int | None = None  # kept samples per copy task (default 4 shards' worth)
    uids: bool = True                 # write uids.npy when the rows carry uids
    ray: object = None                # pipeline.config.RayOptions
    max_in_flight: int | None = None  # copy tasks at once (default: CPUs)
    retries: int = 2                  # extra attempts for a failed copy task
    progress: bool | None = None      # progress bars (default: on a terminal)
    executor: str = "auto"            # the copy tasks: "local" threads, "ray" tasks, "auto" (Ray on a cluster)
    dedup: str | None = None          # a `wclip dedup` folder: removed duplicates are not eligible
    balance: str | None = None        # a group column (image_cluster): fractions become per-group quotas
    balance_alpha: float = 0.5        # quotas proportional to group size ** alpha

    def __post_init__(self):
        _check_executor(self.executor)
        if not 0.0 <= self.balance_alpha <= 1.0:
            raise ValueError(f"--balance-alpha must be in [0, 1]; got {self.balance_alpha}")
        if self.balance and not any(getattr(c, "kind", None) == "fraction" for c in self.conditions):
            raise ValueError(f"--balance {self.balance} splits a --keep-fraction into per-cluster quotas: "
                             f"give one (e.g. --keep-fraction clip_score=0.5)")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}; got {self.input_format!r}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1; got {self.samples_per_shard}")
        if self.samples_per_task is not None and self.samples_per_task < 1:
            raise ValueError(f"samples_per_task must be >= 1; got {self.samples_per_task}")
        if Path(self.output).resolve() == Path(self.scores).resolve():
            raise ValueError("--output must be a different folder from --scores")


DEDUP_CLUSTERS = ("auto", "scores", "kmeans")  # where dedup's clusters come from
DEDUP_CLUSTER_ROWS = 50_000  # rows an own k-means cluster holds on average: K = ceil(rows / this)
DEDUP_BLOCK = 4096  # rows per side of one block product in dedup's pair search


@dataclass(frozen=True)
class DedupConfig:
    """``wclip dedup``: duplicate groups of a scores folder's rows, and the one row each group keeps."""

    scores: str                       # scores folder
    output: str                       # dedup folder (its own; score files are never rewritten)
    keep: str = "clip_score:highest"  # the representative rule (pipeline.curate.dedup_pairs.Rule)
    eps: float = 0.05                 # duplicates: cosine >= 1 - eps
    embeddings: tuple = ()            # embeddings paths (default: the scores folder's saved ones)
    embedding_key: Optional[str] = None  # DataComp .npz arrays: "l14" or "b32"
    tower: str = "image"              # whose embeddings and clusters
    clusters: str = "auto"            # DEDUP_CLUSTERS: the scores' <tower>_cluster, or an own k-means
    cluster_rows: int = DEDUP_CLUSTER_ROWS
    cluster_sample: int = CLUSTER_SAMPLE  # rows the own k-means is found on (smallest key hashes)
    seed: int = 0                     # k-means, and --keep random
    block: int = DEDUP_BLOCK
    device: str = "cpu"               # torch device of the pair search
    overwrite: bool = False
    ray: object = None                # RayOptions
    max_in_flight: Optional[int] = None
    retries: int = 2
    progress: Optional[bool] = None
    executor: str = "auto"

    def __post_init__(self):
        _check_executor(self.executor)
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"--eps must be in (0, 1) (duplicates: cosine >= 1 - eps); got {self.eps}")
        if self.clusters not in DEDUP_CLUSTERS:
            raise ValueError(f"--clusters must be one of {', '.join(DEDUP_CLUSTERS)}; got {self.clusters!r}")
        if self.tower not in ("image", "text"):
            raise ValueError(f"--tower must be image or text; got {self.tower!r}")
        if self.embedding_key is not None and self.embedding_key not in EMBEDDING_KEYS:
            raise ValueError(f"--embedding-key must be one of {EMBEDDING_KEYS}; got {self.embedding_key!r}")
        for name in ("cluster_rows", "cluster_sample", "block"):
            _positive(name.replace("_", "-"), getattr(self, name))
        _positive("max_in_flight", self.max_in_flight, allow_none=True)
        _non_negative("retries", self.retries)
        if Path(self.output).resolve() == Path(self.scores).resolve():
            raise ValueError("--output must be a different folder from --scores")


@dataclass(frozen=True)
class CardConfig:
    """Everything ``wclip card`` needs."""

    scores: str                       # scores folder (or a filter's kept/ folder)
    stats: str                        # stats file from `wclip fit`
    output: str                       # card folder
    filter_dir: str | None = None     # output folder of `wclip filter`, for its filter.json
    inputs: tuple = ()                # shard URLs to read thumbnails from (else the `shard` column)
    extremes: int = 8                 # images in each of the least / most likely strips
    rel_err: float = 0.001            # quantile sketch relative error
    thumbnails: bool = True           # read images from the shards for the strips

    def __post_init__(self):
        if not 0 < self.rel_err < 0.5:
            raise ValueError(f"rel_err must be in (0, 0.5); got {self.rel_err}")
        if self.extremes < 0:
            raise ValueError(f"extremes must be >= 0; got {self.extremes}")


EMBEDDING_KEYS = ("l14", "b32")  # DataComp's .npz arrays: {key}_img, {key}_txt


@dataclass(frozen=True)
class EmbeddingRunConfig:
    """What the embeddings jobs share: precomputed embedding files in, no model, no encoders."""

    paths: tuple  # clip-retrieval folders, DataComp .npz URLs or brace patterns, or folders of .npz
    key: Optional[str] = None  # DataComp: which arrays ("l14" or "b32"); None for clip-retrieval folders
    ray: RayOptions = field(default_factory=RayOptions)
    max_in_flight: Optional[int] = None  # files processed at once (default: CPUs available)
    retries: int = 2  # extra attempts for a failed file before it is recorded as failed
    block_rows: int = 4096  # rows read and scored at a time (in the CPU's cache; bounds a task's memory)
    progress: Optional[bool] = None  # progress bar (None: when stderr is a terminal)
    executor: str = "auto"  # EXECUTORS (pipeline.executors): "local" (threads of this process), "ray", or "auto"
    model: Optional[DeclaredModel] = None  # --embeddings-model: the model that made the vectors (None: not said)
    device: str = "cpu"  # score: where blocks are whitened ("cpu", "cuda", "cuda:1"); tasks stay on this machine
    backend: str = "auto"  # score: whitening.kernels.BACKENDS ("auto": NumPy on the CPU, the tar path's on CUDA)

    def __post_init__(self):
        from pipeline.whitening.kernels import BACKENDS

        if not self.paths:
            raise ValueError("no embedding paths given")
        _check_executor(self.executor)
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.key is not None and self.key not in EMBEDDING_KEYS:
            raise ValueError(f"embedding key must be one of {EMBEDDING_KEYS}, got {self.key!r}")
        _positive("max_in_flight", self.max_in_flight, allow_none=True)
        _positive("block_rows", self.block_rows)
        _non_negative("retries", self.retries)


@dataclass(frozen=True)
class EmbeddingScoreConfig:
    """``wclip score --embeddings``: per-file Parquet scores under ``output``."""

    run: EmbeddingRunConfig
    stats_path: str
    output: str
    overwrite: bool = False  # redo files that already have a completion marker


@dataclass(frozen=True)
class EmbeddingFitConfig:
    """``wclip fit --embeddings``: whitening statistics of precomputed embeddings."""

    run: EmbeddingRunConfig
    output: str
    components: Union[None, int, str] = "auto"  # kept components m: None (all), an int, or "auto"
    shrinkage: float = 0.0  # S + a * trace(S)/d * I
    holdout: float = 0.1  # fraction held out (by key hash) for calibration
    max_samples: Optional[int] = None  # cap on rows read (the first rows of the first files)
    max_heldout: int = MAX_HELDOUT  # as FitConfig.max_heldout
    seed: int = 0  # seed of the held-out hash
    clusters: Union[None, int, str] = None  # as FitConfig.clusters
    cluster_sample: int = CLUSTER_SAMPLE  # as FitConfig.cluster_sample

    def __post_init__(self):
        FitConfig.__post_init__(self)
