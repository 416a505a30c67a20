"""The Ray executor (:mod:`pipeline.executor`) — the only module that talks to Ray.

A job is a set of shards. Each shard is one Ray task that reads and decodes it on a CPU, and encodes its
chunks either itself (CPU-only: a model in each reader task) or on encoder actors (one per GPU, or
``--encoders N``), then hands the assembled shard to the job's sink (:mod:`pipeline.flow.write`). The driver
keeps a bounded number of shard tasks in flight, retries failed shards, reports the ones that keep failing,
and shows progress. Tasks and actors survive the loss of their node (retried, restarted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
import uuid
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Optional

import ray

from pipeline.config import RayOptions, RunConfig
from pipeline.executor import (
    Collector,
    Encoders,
    JobReport,
    Outcome,
    cpu_encode_config,
    describe_error,
    failure_line,
    shard_config,
)
from pipeline.flow.assemble import ShardAssembler
from pipeline.flow.stage import EncodeStage, encode_shard, shard_chunks
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


# -- generic bounded task map (file maps, the filter's resharding) ---------------------------------------
def map_tasks(fn: Callable, items: list, *, desc: str = "shards", max_retries: int = 2,
              max_in_flight: Optional[int] = None, num_cpus: float = 1,
              progress: Optional[bool] = None, samples: Optional[Callable[[Any], int]] = None) -> list:
    """Run ``fn(item)`` as a Ray task per item, at most ``max_in_flight`` at once, each retried up to
    ``max_retries`` times; return a :class:`pipeline.executor.Outcome` per item, in input order. ``samples(result)``, if
    given, is what the progress bar counts as samples for a finished item."""
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
                    outcomes[i] = Outcome(items[i], True, ray.get(ref))
                except Exception as exc:  # recorded, the other items go on
                    outcomes[i] = Outcome(items[i], False, error=describe_error(exc))
                    bar.write(failure_line(max_retries, outcomes[i].error))
                bar.update(1, samples=samples(outcomes[i].result) if samples and outcomes[i].ok else 0)
    return outcomes


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
def _shard_task(url, run: RunConfig, encoders: Encoders, transforms, sink):
    """Read one shard, encode it (here, or on the actors), and hand the assembled shard to ``sink.finish``."""
    if encoders.local:
        return encode_shard(url, run, _local_stage(encoders.local), sink)
    assembler = ShardAssembler(url)
    reader, chunks = shard_chunks(url, run, transforms)
    pending: deque = deque()
    actors = encoders.actors
    offset = hash(url) % len(actors)
    for i, (prepared, chunk) in enumerate(chunks):
        actor = actors[(offset + i) % len(actors)]
        pending.append((prepared, chunk, actor.process.remote(chunk, sink.keep_embeddings)))
        while len(pending) > OUTSTANDING_CHUNKS:
            p, c, ref = pending.popleft()
            assembler.add(p, c, ray.get(ref))
    while pending:
        p, c, ref = pending.popleft()
        assembler.add(p, c, ray.get(ref))
    return sink.finish(assembler, reader.damage)


def run_shards(run: RunConfig, urls: list, encoders: Encoders, sink, collector: Optional[Collector] = None,
               skipped: int = 0) -> JobReport:
    """Process ``urls`` with at most ``run.max_in_flight`` shard tasks at once, each handing its assembled
    shard to ``sink``; ``collector`` sees the results in completion order."""
    collector = collector or Collector()
    # The tasks resolve the transforms themselves: the driver never needs torch or open_clip for them.
    transforms_ref = encoders.actors[0].transforms.remote() if encoders.actors else None
    if transforms_ref is not None:
        ray.wait([transforms_ref])
    task = ray.remote(num_cpus=1, max_retries=run.retries, retry_exceptions=True)(_shard_task)
    limit = run.max_in_flight or cluster_cpus()
    queue = deque(enumerate(urls))
    running: dict = {}
    report = JobReport(skipped=skipped)
    failed = report.failed
    started = time.time()
    with Progress(total=len(urls) + skipped, initial=skipped, desc=sink.desc, enabled=run.progress) as bar:
        while (queue and not collector.stop) or running:
            while queue and len(running) < limit and not collector.stop:
                i, url = queue.popleft()
                running[task.remote(url, shard_config(run, url), encoders, transforms_ref, sink)] = (i, url)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i, url = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    error = describe_error(exc)
                    log.debug("shard %s failed: %s", url, traceback.format_exc())
                    failed.append((url, error))
                    collector.failed(i, url)
                    bar.write(failure_line(run.retries, error, url))
                    continue
                report.add(result)
                collector.add(i, url, result)
                bar.update(1, samples=result["summary"]["rows"])
    report.elapsed = time.time() - started
    return report


class RayJobs:
    """The Ray executor as :func:`pipeline.launch.jobs` hands it out: a Ray session (attached or started)
    for the ``with`` block, and the job functions of this module."""

    def __init__(self, options: Optional[RayOptions] = None):
        self._session = ray_session(options)

    def __enter__(self) -> "RayJobs":
        self._session.__enter__()
        return self

    def __exit__(self, *exc):
        return self._session.__exit__(*exc)

    start_encoders = staticmethod(start_encoders)
    encoder_info = staticmethod(encoder_info)
    run_shards = staticmethod(run_shards)
