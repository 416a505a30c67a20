"""The executors' contract: what every executor offers (:class:`Executor`), takes and gives back.

* ``ray`` (:mod:`pipeline.executors.ray`): a Ray cluster, or a private local Ray; encoder actors on GPUs,
  shard tasks spread over nodes, node loss survived.
* ``local`` (:mod:`pipeline.executors.local`): this machine only, no Ray: tar shards in worker processes
  forked from the command (they inherit its imported torch and open_clip), file tasks on threads. On one
  CPU-only machine it starts in a fraction of a second where a local Ray takes seconds (docs/benchmarks.md),
  and holds no Ray processes in memory.

``--executor auto`` (the default) picks Ray when a cluster is named (``--address`` / ``RAY_ADDRESS``), when
Ray is already running in this process (a notebook, the tests), or when the job wants what only the Ray
executor has (GPUs, ``--encoders N`` encoder actors, ``--decode gpu``); else local (:func:`uses_ray`).
:func:`pipeline.executors.open_executor` is the one place that choice is made.

Both executors take the same work (:class:`Encoders`, a sink, a :class:`Collector`, a function and its
items) and give back the same :class:`JobReport` (shard jobs) or :class:`Outcome` per item (maps); both run
their tasks through the one bounded loop of :mod:`pipeline.executors.loop`. This module imports neither
executor (they import it) and never imports Ray.
"""

from __future__ import annotations

import abc
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Optional


def uses_ray(run) -> bool:
    """Whether ``run`` (a :class:`pipeline.config.RunConfig` or :class:`pipeline.config.EmbeddingRunConfig`)
    runs on Ray; see the module's docstring for ``auto``."""
    if run.executor != "auto":
        return run.executor == "ray"
    if getattr(run.ray, "address", None) or os.environ.get("RAY_ADDRESS") or _ray_running():
        return True
    encode = getattr(run, "encode", None)  # tar jobs: what needs the Ray executor's actors
    if encode is None:
        return False
    wants_gpu = encode.device.startswith("cuda") or run.inputs.decode == "gpu" or bool(run.ray.num_gpus)
    return wants_gpu or run.encoders is not None or (encode.device == "auto" and _cuda_available())


def _ray_running() -> bool:
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to ask
    return bool(ray is not None and ray.is_initialized())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, as Ray counts them), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_cpus(ray) -> int:
    """The CPUs a job without Ray uses on this machine: ``--num-cpus`` (``ray``: a RayOptions, or None), else
    :func:`usable_cpus`."""
    return getattr(ray, "num_cpus", None) or usable_cpus()


@dataclass
class Encoders:
    """Where a job's chunks are encoded: encoder actors (Ray only: one per GPU, or ``--encoders N``), or a
    model inside each reader task (CPU-only; no chunk crosses between processes, no extra process)."""

    actors: list  # EncodeStage actors; empty when encoding in the reader tasks
    local: Optional[tuple] = None  # (token, spec, encode config, stats or a Ray reference to them)

    def __len__(self) -> int:
        return len(self.actors)

    def describe(self) -> str:
        return f"{len(self.actors)} encoder actor(s)" if self.actors else "a model in each reader task"


@dataclass
class Outcome:
    """What became of one item of a file map: its result, or the error after the last attempt."""

    item: Any
    ok: bool
    result: Any = None
    error: Optional[str] = None


def describe_error(exc: BaseException) -> str:
    """One record of a failure: the exception's type and message (a Ray task error's cause, unwrapped)."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}".strip()[:2000]


def failure_line(retries: int, error: str, shard: str = "") -> str:
    """The one line a progress bar prints for a task (or a ``shard``) that failed after its retries."""
    what = f"shard failed after {retries} retries: {shard}: " if shard else f"failed after {retries} retries: "
    return what + (error.splitlines() or [""])[0]


@dataclass
class JobReport:
    """Outcome of a streaming job, counted as shard results arrive (:meth:`add`): a driver keeps the totals,
    not every shard's summary (those were ~1.6-3.4 KB a shard, 1-2 GB for 585,000 shards)."""

    skipped: int = 0  # shards already done before this run
    failed: list = field(default_factory=list)  # (url, error) of shards that failed every attempt
    elapsed: float = 0.0
    shards_done: int = 0
    rows: int = 0
    status: Counter = field(default_factory=Counter)  # rows by status
    damaged: list = field(default_factory=list)  # (shard, damage) of the shards that were damaged

    def add(self, result: dict) -> None:
        """Count one finished shard (``sink.finish``'s result)."""
        summary = result["summary"]
        self.shards_done += 1
        self.rows += summary["rows"]
        self.status.update(summary["status_counts"])
        if summary.get("damage"):
            self.damaged.append((summary["shard"], summary["damage"]))

    def summary(self) -> dict:
        """What the command prints: rows by status, damaged and failed shards, throughput."""
        return {"rows": self.rows, "status_counts": dict(sorted(self.status.items())),
                "shards_done": self.shards_done, "shards_skipped": self.skipped,
                "failed": [{"shard": u, "error": e} for u, e in self.failed], "damaged": list(self.damaged),
                "elapsed_s": round(self.elapsed, 2),
                "samples_per_s": round(self.rows / self.elapsed, 1) if self.elapsed > 0 else None}


class Collector:
    """What a job may do with shard results as they arrive (the default keeps nothing and never stops)."""

    stop = False  # True: start no more shards

    def add(self, index: int, url: str, result: dict) -> None:
        """Shard ``index`` (position in the job's URL list) finished with ``result``."""

    def failed(self, index: int, url: str) -> None:
        """Shard ``index`` failed every attempt."""


def shard_config(run, url: str):
    """The run config one shard task is sent: with its own URL in place of the job's list. Every task is
    pickled with its config, so a list of 10^5 URLs made each task 4.4 MB and the job's cost grow with the
    square of its shards (docs/benchmarks.md, cost curves)."""
    return replace(run, shards=(url,))


def cpu_encode_config(encode_cfg, cpus: int, in_flight: int):
    """The encode config of a CPU job whose model runs in each of ``in_flight`` reader tasks on ``cpus``
    cores: torch threads split between them, so the cores are busy without oversubscription."""
    if encode_cfg.threads is not None:
        return encode_cfg
    return replace(encode_cfg, threads=max(1, cpus // in_flight))


def summary_rows(result: dict) -> int:
    """The samples a finished shard or file task counts on a progress bar: its sink's summary's rows."""
    return result["summary"]["rows"]


class Executor(abc.ABC):
    """Where one command's tasks run, for a ``with`` block: :func:`pipeline.executors.open_executor` gives
    one. Shard jobs (``wclip fit`` / ``wclip score`` on tar shards) call :meth:`start_encoders`,
    :meth:`encoder_info`, :meth:`run_shards`; file-sized tasks (the embeddings jobs' files, ``wclip filter``'s
    copy tasks) call :meth:`map`. What an executor needs (a Ray session, a process pool) starts on first use
    and ends with the block; an error or Ctrl-C in the block stops the running tasks."""

    def __enter__(self) -> "Executor":
        return self

    @abc.abstractmethod
    def __exit__(self, *exc) -> bool:
        """End what the executor started (Ray session, workers)."""

    @property
    @abc.abstractmethod
    def slots(self) -> int:
        """Tasks run at once: ``max_in_flight``, else the CPUs (of the Ray cluster, or of this machine)."""

    @abc.abstractmethod
    def start_encoders(self, run, stats=None) -> Encoders:
        """Where ``run``'s chunks will be encoded (with ``stats``: scored too)."""

    @abc.abstractmethod
    def encoder_info(self, run, encoders: Encoders) -> dict:
        """The encoders' :meth:`pipeline.flow.stage.EncodeStage.info`, once one has started."""

    @abc.abstractmethod
    def run_shards(self, run, urls: list, encoders: Encoders, sink, collector: Optional[Collector] = None,
                   skipped: int = 0) -> JobReport:
        """One task per shard of ``urls`` (``run.max_in_flight`` at once, each retried ``run.retries`` times),
        each handing its assembled shard to ``sink``; ``collector`` sees the results in completion order."""

    @abc.abstractmethod
    def map(self, fn, items: list, desc: str = "tasks", *, samples=None, max_retries: Optional[int] = None,
            max_in_flight: Optional[int] = None, progress: Optional[bool] = None) -> list:
        """``fn(item)`` for every item, :attr:`slots` (or ``max_in_flight``) at once, each retried
        ``max_retries`` (default: the run's ``retries``) times: an :class:`Outcome` per item, in input order.
        ``samples(result)``, if given, is what the progress bar counts for a finished item."""
