"""The Ray executor (:mod:`pipeline.executors.contract`): the only module of ``pipeline`` that imports Ray
(``lint-imports`` and ``tests/test_imports.py`` hold every other module to that).

A job is a set of shards. Each shard is one Ray task that reads and decodes it on a CPU, and encodes its
chunks either itself (CPU-only: a model in each reader task) or on encoder actors (one per GPU, or
``--encoders N``), then hands the assembled shard to the job's sink (:mod:`pipeline.scores.sinks`); the shard
body is :func:`pipeline.flow.stage.assemble_shard`, as in the local executor, only where chunks are encoded
differs. File tasks are one Ray task each. The driver keeps a bounded number of tasks in flight, reports the
ones that keep failing and shows progress (:mod:`pipeline.executors.loop`); Ray retries them itself
(``max_retries``), so tasks and actors survive the loss of their node (retried, restarted).

Progress within a shard: a job's shard tasks send the samples they have done so far to one small actor of
the job (:class:`_Board`, no CPU reserved, placed on the driver's node; a fire-and-forget call at most every
:data:`pipeline.progress.REPORT_EVERY_S` per task, holding only the latest count per running task), which
the driver asks every :data:`pipeline.progress.POLL_S` without waiting for the answer (it takes it on its
next poll). An actor is the one channel that reaches the driver from every node; a ``ray.util.queue`` is an
actor too, but keeps every message where this keeps one number per running task.

The session (attached to a cluster, or a private local Ray) opens on the executor's first use: a command
that ends up with nothing to run (``wclip filter`` resumed with every copy done) never starts Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import RayOptions, RunConfig
from pipeline.executors.contract import (
    Collector,
    Encoders,
    Executor,
    JobReport,
    cpu_encode_config,
    shard_config,
)
from pipeline.executors.loop import Backend, map_items, run_job
from pipeline.flow import stage
from pipeline.flow.stage import EncodeStage
from pipeline.progress import TaskReport

OUTSTANDING_CHUNKS = 2  # chunks a shard task may have at the encoders at once (bounds memory)
ENCODER_RESTARTS = 20  # restarts of one encoder actor over a job (node losses)


# -- session ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(options: Optional[RayOptions] = None):
    """Attach to ``options.address`` / ``RAY_ADDRESS``, or start a private, quiet local Ray.

    A Ray that is already initialised in this process (tests, notebooks) is reused and left running.
    """
    options = options or RayOptions()
    _quiet_ray_notices()
    if not sys.stderr.isatty():  # worker lines forwarded to a log file or pipe: no colour escape codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if ray.is_initialized():
        yield
        return
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = dict(logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False,
                        configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Workers inherit this process's environment: torch threads that wait passively, so encoders and
        # readers sharing cores do not spin against each other.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        ray.init(address="local", num_cpus=options.num_cpus, num_gpus=options.num_gpus, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


class _DropNotice(logging.Filter):
    """Drops Ray's notice that its default token authentication is on: nothing for a user to do."""

    def filter(self, record) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in str(record.msg)


def _quiet_ray_notices() -> None:
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropNotice) for f in logger.filters):
        logger.addFilter(_DropNotice())


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


# -- the loop's backend and file maps -------------------------------------------------------------------
class _Refs(Backend):
    """Ray ObjectRefs: ``ray.wait`` for any, ``ray.get`` for its result; Ray retries tasks itself."""

    retries_itself = True

    def wait_any(self, handles: list, timeout: float) -> list:
        return ray.wait(handles, num_returns=1, timeout=timeout)[0]

    def result(self, handle):
        return ray.get(handle)


def map_tasks(fn: Callable, items: list, *, desc: str = "shards", max_retries: int = 2,
              max_in_flight: Optional[int] = None, num_cpus: float = 1,
              progress: Optional[bool] = None, samples: Optional[Callable[[Any], int]] = None) -> list:
    """Run ``fn(item)`` as a Ray task per item, at most ``max_in_flight`` at once, each retried up to
    ``max_retries`` times; return a :class:`pipeline.executors.contract.Outcome` per item, in input order.
    ``samples(result)``, if given, is what the progress bar counts as samples for a finished item."""
    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=True)(fn)
    return map_items(_Refs(), remote.remote, items, desc=desc, limit=max_in_flight or cluster_cpus(),
                     retries=max_retries, progress=progress, samples=samples)


# -- encoders -------------------------------------------------------------------------------------------
def start_encoders(run: RunConfig, stats=None) -> Encoders:
    """Start the encoders: one actor per GPU (or ``run.encoders``), else the model runs in the reader tasks."""
    gpus = cluster_gpus()
    encode_cfg = run.encode
    on_gpu = encode_cfg.device.startswith("cuda") or (encode_cfg.device == "auto" and gpus > 0)
    if not on_gpu and run.encoders is None:
        # One reader task per CPU, each encoding its own chunks with one torch thread: the cores are all
        # busy without oversubscription, and nothing is copied between processes.
        encode_cfg = cpu_encode_config(encode_cfg, cluster_cpus(), run.max_in_flight or cluster_cpus())
        return Encoders([], (uuid.uuid4().hex, run.model, encode_cfg, ray.put(stats)))
    count = run.encoders or (max(gpus, 1) if on_gpu else 1)
    if on_gpu:
        # Asking for a GPU also makes an autoscaling cluster with no GPU node yet start one.
        options = dict(num_gpus=1, num_cpus=1)
    else:
        # Encoder actors asked for on CPU share the cores with the reader tasks (they reserve none); few
        # torch threads (a quarter of the node's CPUs): oversubscribed spin-waiting OpenMP threads slow
        # torch down 10-50x (the job's OMP_WAIT_POLICY is PASSIVE, see ray_session).
        options = dict(num_cpus=0)
        if encode_cfg.threads is None:
            encode_cfg = replace(encode_cfg, threads=max(1, cluster_cpus() // (4 * count)))
    # Restarted when their node dies (spot instances come and go), each call retried on the new one;
    # bounded so that an encoder that cannot start (bad weights, no memory) fails the job, not loops.
    actor_cls = ray.remote(max_restarts=ENCODER_RESTARTS, max_task_retries=ENCODER_RESTARTS)(EncodeStage)
    return Encoders([actor_cls.options(**options).remote(run.model, encode_cfg, stats) for _ in range(count)])


def _local_stage(local: tuple) -> EncodeStage:
    token, spec, encode_cfg, stats = local
    if isinstance(stats, ray.ObjectRef):
        stats = ray.get(stats)
    return EncodeStage.cached(token, spec, encode_cfg, stats)


def _local_info(local: tuple) -> dict:
    return _local_stage(local).info()


def encoder_info(run: RunConfig, encoders: Encoders) -> dict:
    """The encoders' :meth:`EncodeStage.info`, once one has started; raises ValueError when the
    configuration asks for something this model cannot do (``--decode gpu`` with an unusual preprocess)."""
    if encoders.actors:
        info = ray.get(encoders.actors[0].info.remote())
    else:
        info = ray.get(ray.remote(num_cpus=1)(_local_info).remote(encoders.local))
    if run.inputs.decode == "gpu" and info["device_decode_unsupported"]:
        raise ValueError(f"--decode gpu: {info['device_decode_unsupported']}; use --decode cpu for this model")
    return info


# -- the shard task -----------------------------------------------------------------------------------
def _on_actors(actors: list, url: str) -> Callable:
    """``encode(chunks, keep_embeddings)`` for :func:`pipeline.flow.stage.assemble_shard`: the chunks
    spread over the encoder actors, at most ``OUTSTANDING_CHUNKS`` of them there at once, results in order."""
    def encode(chunks, keep_embeddings: bool):
        pending: deque = deque()
        offset = hash(url) % len(actors)
        for i, (prepared, chunk) in enumerate(chunks):
            actor = actors[(offset + i) % len(actors)]
            pending.append((prepared, chunk, actor.process.remote(chunk, keep_embeddings)))
            while len(pending) > OUTSTANDING_CHUNKS:
                p, c, ref = pending.popleft()
                yield p, c, ray.get(ref)
        while pending:
            p, c, ref = pending.popleft()
            yield p, c, ray.get(ref)
    return encode


class _Board:
    """Samples done so far by each running shard task of a job (task key -> count): the tasks send theirs,
    the driver takes those of the tasks still running (the others are dropped)."""

    def __init__(self):
        self.counts: dict = {}

    def report(self, key: int, samples: int) -> None:
        self.counts[key] = samples

    def take(self, keys: list) -> dict:
        keys = set(keys)
        self.counts = {k: n for k, n in self.counts.items() if k in keys}
        return self.counts


class _Shards(_Refs):
    """The shard tasks' ObjectRefs, with their progress from the job's :class:`_Board`."""

    def __init__(self):
        here = ray.get_runtime_context().get_node_id()
        placement = NodeAffinitySchedulingStrategy(node_id=here, soft=True) if here else "DEFAULT"
        self.board = ray.remote(num_cpus=0, max_restarts=-1)(_Board).options(
            scheduling_strategy=placement).remote()
        self.key_of: dict = {}  # a running task's ObjectRef -> its key
        self.counts: dict = {}  # key -> samples, as the last answer said
        self._asked = None  # the board's answer to come
        self._keys = 0

    def submit(self, start: Callable):
        """``start(board, key)`` starts a shard task that reports to ``board`` as ``key``: its ObjectRef."""
        self._keys += 1
        ref = start(self.board, self._keys)
        self.key_of[ref] = self._keys
        return ref

    def live(self, handles: list) -> dict:
        running = {self.key_of[h]: h for h in handles if h in self.key_of}
        self.key_of = {h: k for k, h in running.items()}  # finished tasks are not asked about again
        if self._asked is not None and ray.wait([self._asked], timeout=0)[0]:
            try:
                self.counts = ray.get(self._asked)
            except ray.exceptions.RayError:  # the board's node was lost: it restarts, counting from scratch
                self.counts = {}
            self._asked = None
        if self._asked is None:
            self._asked = self.board.take.remote(list(running))
        return {h: self.counts[k] for k, h in running.items() if k in self.counts}

    def close(self) -> None:
        ray.kill(self.board)


def _shard_task(url, run: RunConfig, encoders: Encoders, transforms, sink, board, key: int):
    """Read one shard, encode it (here, or on the actors), and hand the assembled shard to ``sink.finish``;
    the samples done so far go to ``board`` as they grow."""
    report = TaskReport(lambda samples: board.report.remote(key, samples))
    if encoders.local:
        return stage.encode_shard(url, run, _local_stage(encoders.local), sink, report=report)
    return stage.assemble_shard(url, run, transforms, _on_actors(encoders.actors, url), sink, report)


def run_shards(run: RunConfig, urls: list, encoders: Encoders, sink, collector: Optional[Collector] = None,
               skipped: int = 0) -> JobReport:
    """Process ``urls`` with at most ``run.max_in_flight`` shard tasks at once, each handing its assembled
    shard to ``sink``; ``collector`` sees the results in completion order."""
    # The tasks resolve the transforms themselves: the driver never needs torch or open_clip for them.
    transforms_ref = encoders.actors[0].transforms.remote() if encoders.actors else None
    if transforms_ref is not None:
        ray.wait([transforms_ref])
    task = ray.remote(num_cpus=1, max_retries=run.retries, retry_exceptions=True)(_shard_task)
    shards = _Shards()

    def submit(url: str):
        return shards.submit(lambda board, key: task.remote(url, shard_config(run, url), encoders, transforms_ref,
                                                            sink, board, key))

    try:
        return run_job(shards, submit, run, urls, sink, collector, skipped,
                       limit=run.max_in_flight or cluster_cpus())
    finally:
        shards.close()


class RayExecutor(Executor):
    """Ray for the ``with`` block: a session attached or started on first use (and shut down with the block
    if this executor started it), the job functions of this module. ``run``: the job's config (a RunConfig,
    EmbeddingRunConfig or FilterConfig)."""

    def __init__(self, run):
        self.run = run
        self._stack = contextlib.ExitStack()
        self._started = False

    def _session(self) -> None:
        if not self._started:
            self._stack.enter_context(ray_session(self.run.ray))
            self._started = True

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    @property
    def slots(self) -> int:
        self._session()
        return self.run.max_in_flight or cluster_cpus()

    def start_encoders(self, run: RunConfig, stats=None) -> Encoders:
        self._session()
        return start_encoders(run, stats)

    def encoder_info(self, run: RunConfig, encoders: Encoders) -> dict:
        self._session()
        return encoder_info(run, encoders)

    def run_shards(self, run: RunConfig, urls: list, encoders: Encoders, sink,
                   collector: Optional[Collector] = None, skipped: int = 0) -> JobReport:
        self._session()
        return run_shards(run, urls, encoders, sink, collector, skipped)

    def map(self, fn, items: list, desc: str = "tasks", *, samples=None, max_retries: Optional[int] = None,
            max_in_flight: Optional[int] = None, progress: Optional[bool] = None) -> list:
        self._session()
        return map_tasks(fn, items, desc=desc, samples=samples,
                         max_retries=self.run.retries if max_retries is None else max_retries,
                         max_in_flight=max_in_flight or self.run.max_in_flight,
                         progress=self.run.progress if progress is None else progress)
