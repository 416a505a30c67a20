"""Execution on Ray — the only module that talks to Ray.

A job is a set of shards. Each shard is one Ray task that reads and decodes it on a CPU, sends chunks
of model inputs to encoder actors (one per GPU, or one on CPU-only machines), and hands the assembled
shard to the job's sink (:mod:`pipeline.flow.write`). The driver keeps a bounded number of shard tasks
in flight, retries failed shards, reports the ones that keep failing, and shows progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray

from pipeline.config import RayOptions, RunConfig
from pipeline.flow.assemble import ShardAssembler
from pipeline.flow.batch import Chunk, ChunkResult, read_chunks
from pipeline.flow.encode import Encoder
from pipeline.flow.preprocess import Preprocessor
from pipeline.flow.read import ShardReader
from pipeline.flow.whiten import ChunkScorer
from pipeline.progress import Progress

log = logging.getLogger("wclip")

OUTSTANDING_CHUNKS = 2  # chunks a shard task may have at the encoders at once (bounds memory)
ENCODER_RESTARTS = 20  # restarts of one encoder actor over a job (node losses)


# -- session ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(options: Optional[RayOptions] = None):
    """Attach to ``options.address`` / ``RAY_ADDRESS``, or start a private, quiet local Ray.

    A Ray that is already initialised in this process (tests, notebooks) is reused and left running.
    """
    options = options or RayOptions()
    if ray.is_initialized():
        yield
        return
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = dict(logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False,
                        configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=options.num_cpus, num_gpus=options.num_gpus, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


# -- generic bounded task map (used by filter's resharding) -----------------------------------------
@dataclass
class TaskOutcome:
    """What became of one item: its result, or the error after the last retry."""

    item: Any
    ok: bool
    result: Any = None
    error: Optional[str] = None


def map_tasks(fn: Callable, items: list, *, desc: str = "shards", max_retries: int = 2,
              max_in_flight: Optional[int] = None, num_cpus: float = 1,
              progress: Optional[bool] = None) -> list:
    """Run ``fn(item)`` as a Ray task per item, at most ``max_in_flight`` at once, each retried up to
    ``max_retries`` times; return a :class:`TaskOutcome` per item, in input order."""
    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=True)(fn)
    limit = max_in_flight or cluster_cpus()
    outcomes: list = [None] * len(items)
    queue = deque(range(len(items)))
    running: dict = {}
    with Progress(total=len(items), desc=desc, enabled=progress) as bar:
        while queue or running:
            while queue and len(running) < limit:
                i = queue.popleft()
                running[remote.remote(items[i])] = i
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                i = running.pop(ref)
                try:
                    outcomes[i] = TaskOutcome(items[i], True, ray.get(ref))
                except Exception as exc:  # recorded, the other items go on
                    outcomes[i] = TaskOutcome(items[i], False, error=_describe(exc))
                bar.update(1)
    return outcomes


def _describe(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}".strip()[:2000]


# -- encoders -------------------------------------------------------------------------------------------
class EncoderActor:
    """One CLIP model on one device (a GPU, or this node's CPUs)."""

    def __init__(self, spec, encode_cfg, stats=None):
        logging.getLogger().setLevel(logging.WARNING)
        self.encoder = Encoder(spec, encode_cfg)
        self.scorer = ChunkScorer(stats, self.encoder.device)

    def transforms(self):
        return self.encoder.preprocess, self.encoder.tokenizer

    def info(self) -> dict:
        import torch

        enc = self.encoder
        with torch.inference_mode():
            dims = {"image": int(enc.model.encode_image(torch.zeros(
                        1, 3, *_image_size(enc), device=enc.device)).shape[1]),
                    "text": int(enc.model.encode_text(torch.zeros(
                        1, int(enc.model.context_length or 77), dtype=torch.long, device=enc.device)).shape[1])}
        return {"device": str(enc.device), "precision": enc.precision, "dims": dims,
                "preprocess_split": enc.preprocessor.split,
                "device_decode_unsupported": enc.device_decode_unsupported}

    def process(self, chunk: Chunk, keep_embeddings: bool = False) -> ChunkResult:
        return self.scorer.score(chunk, self.encoder.encode(chunk), keep_embeddings)


def _image_size(enc) -> tuple:
    size = getattr(enc.model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def start_encoders(run: RunConfig, stats=None) -> list:
    """Create the encoder actors: one per GPU, else ``run.encoders`` (default 1) sharing the CPUs."""
    gpus = cluster_gpus()
    encode_cfg = run.encode
    on_gpu = encode_cfg.device.startswith("cuda") or (encode_cfg.device == "auto" and gpus > 0)
    count = run.encoders or (max(gpus, 1) if on_gpu else 1)
    if on_gpu:
        # Asking for a GPU also makes an autoscaling cluster with no GPU node yet start one.
        options = dict(num_gpus=1, num_cpus=1)
    else:
        # On CPU the encoder shares the cores with the reader tasks (one per CPU): it reserves none,
        # so reading and encoding overlap. Oversubscribed OpenMP threads that spin-wait slow torch
        # down by 10-50x (measured: 20 ms vs 600 ms per 128-sample chunk on 2 busy cores), hence
        # few torch threads (a quarter of the node's CPUs) and a passive OpenMP wait policy.
        options = dict(num_cpus=0, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        if encode_cfg.threads is None:
            from dataclasses import replace

            encode_cfg = replace(encode_cfg, threads=max(1, cluster_cpus() // (4 * count)))
    # Restarted when their node dies (spot instances come and go), each call retried on the new one;
    # bounded so that an encoder that cannot start (bad weights, no memory) fails the job, not loops.
    actor_cls = ray.remote(max_restarts=ENCODER_RESTARTS, max_task_retries=ENCODER_RESTARTS)(EncoderActor)
    return [actor_cls.options(**options).remote(run.model, encode_cfg, stats) for _ in range(count)]


def encoder_info(run: RunConfig, encoders: list) -> dict:
    """The first encoder's :meth:`EncoderActor.info`, once it has started; raises ValueError when the
    configuration asks for something this model cannot do (``--decode gpu`` with an unusual preprocess)."""
    info = ray.get(encoders[0].info.remote())
    if run.inputs.decode == "gpu" and info["device_decode_unsupported"]:
        raise ValueError(f"--decode gpu: {info['device_decode_unsupported']}; use --decode cpu for this model")
    return info


# -- the shard task -----------------------------------------------------------------------------------
def _shard_task(url, run: RunConfig, encoders: list, transforms, sink):
    """Read one shard, encode it on the actors, and hand the assembled shard to ``sink.finish``."""
    preprocess, tokenizer = transforms
    preprocessor = Preprocessor(preprocess)
    assembler = ShardAssembler(url)
    reader = ShardReader(url)
    pending: deque = deque()
    offset = hash(url) % len(encoders)
    for i, (prepared, chunk) in enumerate(read_chunks(url, run.inputs, preprocessor, tokenizer,
                                                      run.chunk_size, reader)):
        actor = encoders[(offset + i) % len(encoders)]
        pending.append((prepared, chunk, actor.process.remote(chunk, sink.keep_embeddings)))
        while len(pending) > OUTSTANDING_CHUNKS:
            p, c, ref = pending.popleft()
            assembler.add(p, c, ray.get(ref))
    while pending:
        p, c, ref = pending.popleft()
        assembler.add(p, c, ray.get(ref))
    return sink.finish(assembler, reader.damage)


@dataclass
class JobReport:
    """Outcome of a streaming job."""

    done: list  # per-shard results (``sink.finish``), in completion order
    failed: list  # (url, error) of shards that failed every attempt
    skipped: int  # shards already done before this run
    elapsed: float

    @property
    def rows(self) -> int:
        return sum(d["summary"]["rows"] for d in self.done)

    def summary(self) -> dict:
        """What the command prints: rows by status, damaged and failed shards, throughput."""
        status: Counter = Counter()
        damaged = []
        for d in self.done:
            status.update(d["summary"]["status_counts"])
            if d["summary"].get("damage"):
                damaged.append((d["summary"]["shard"], d["summary"]["damage"]))
        rows = self.rows
        return {"rows": rows, "status_counts": dict(sorted(status.items())),
                "shards_done": len(self.done), "shards_skipped": self.skipped,
                "failed": [{"shard": u, "error": e} for u, e in self.failed], "damaged": damaged,
                "elapsed_s": round(self.elapsed, 2),
                "samples_per_s": round(rows / self.elapsed, 1) if self.elapsed > 0 else None}


class Collector:
    """What a job may do with shard results as they arrive (the default keeps nothing and never stops)."""

    stop = False  # True: start no more shards

    def add(self, index: int, url: str, result: dict) -> None:
        """Shard ``index`` (position in the job's URL list) finished with ``result``."""

    def failed(self, index: int, url: str) -> None:
        """Shard ``index`` failed every attempt."""


def run_shards(run: RunConfig, urls: list, encoders: list, sink, collector: Optional[Collector] = None,
               skipped: int = 0) -> JobReport:
    """Process ``urls`` with at most ``run.max_in_flight`` shard tasks at once, each handing its assembled
    shard to ``sink``; ``collector`` sees the results in completion order."""
    collector = collector or Collector()
    # The tasks resolve the transforms themselves: the driver never needs torch or open_clip for them.
    transforms_ref = encoders[0].transforms.remote()
    ray.wait([transforms_ref])
    task = ray.remote(num_cpus=1, max_retries=run.retries, retry_exceptions=True)(_shard_task)
    limit = run.max_in_flight or cluster_cpus()
    queue = deque(enumerate(urls))
    running: dict = {}
    done, failed = [], []
    started = time.time()
    with Progress(total=len(urls) + skipped, initial=skipped, desc=sink.desc, enabled=run.progress) as bar:
        while (queue and not collector.stop) or running:
            while queue and len(running) < limit and not collector.stop:
                i, url = queue.popleft()
                running[task.remote(url, run, encoders, transforms_ref, sink)] = (i, url)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i, url = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    error = _describe(exc)
                    log.debug("shard %s failed: %s", url, traceback.format_exc())
                    failed.append((url, error))
                    collector.failed(i, url)
                    bar.write(f"shard failed after {run.retries} retries: {url}: {error.splitlines()[0]}")
                    continue
                done.append(result)
                collector.add(i, url, result)
                bar.update(1, samples=result["summary"]["rows"])
    return JobReport(done=done, failed=failed, skipped=skipped, elapsed=time.time() - started)
