"""The local executor (:mod:`pipeline.executor`): a job's tar shards in worker processes of this machine,
without Ray.

The command imports torch and open_clip and builds the model once, with one torch thread (so no OpenMP
thread pool exists yet), then forks its workers (Linux): a worker starts in milliseconds and shares the
libraries and the model's weights with the command (inference never writes them), instead of every worker
loading its own copy; each then sets its own torch threads (one per worker when there are as many workers as
cores). Elsewhere the workers are spawned and each loads the model on its first task. Each shard is one
task, as on Ray: read, decode, encode, score and written by the worker
(:func:`pipeline.flow.stage.encode_shard`), so exactly one set of outputs per shard, written crash-safe.

Failures, as on Ray: an exception in a shard retries it (``--retries``), then records it as failed. A worker
that dies (killed, out of memory, a crash in a native library) takes the pool down with it: the shards that
were running are not charged for it but rerun one at a time in a fresh pool, so only a shard that kills its
worker when running alone uses up its attempts, and no other shard fails because of it.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Optional

from pipeline.config import RunConfig
from pipeline.executor import (
    Collector,
    Encoders,
    JobReport,
    cpu_encode_config,
    describe_error,
    failure_line,
    local_cpus,
    shard_config,
)
from pipeline.progress import Progress

log = logging.getLogger("wclip")


LINUX = sys.platform.startswith("linux")
FORK = LINUX  # elsewhere fork is unsafe (macOS system libraries): spawn


def _context():
    return multiprocessing.get_context("fork" if FORK else "spawn")


_JOB: dict = {}  # in a worker: the job's (token, spec, encode config, stats), given once when it starts


def _remember(local: tuple, parent: int) -> None:
    # Ctrl-C is the command's to handle (it stops the workers); a worker would only print a traceback. A
    # handler that does nothing, not SIG_IGN: an ignored signal stays ignored in the programs a worker starts
    # (`pipe:` commands), which must still stop on Ctrl-C
    signal.signal(signal.SIGINT, _ignore)
    _die_with(parent)
    _JOB["local"] = local
    threads = local[2].threads
    if threads:
        import torch

        torch.set_num_threads(threads)


def _ignore(signum, frame) -> None:
    pass


def _die_with(parent: int) -> None:
    """End this worker when the command ends, however it ends (killed too): no orphan keeps scoring."""
    if LINUX:  # prctl
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the command ended before the line above
        os._exit(1)


def _stage():
    from pipeline.flow.stage import EncodeStage

    return EncodeStage.cached(*_JOB["local"])


def _info() -> dict:
    return _stage().info()


def _shard(url: str, run: RunConfig, sink):
    from pipeline.flow.stage import encode_shard

    return encode_shard(url, run, _stage(), sink)


class LocalJobs:
    """Worker processes of this machine for the ``with`` block: ``start_encoders``, ``encoder_info`` and
    ``run_shards`` as in :class:`pipeline.runtime.RayJobs`."""

    def __init__(self, run: RunConfig):
        self.cpus = local_cpus(run.ray)
        self.workers = run.max_in_flight or self.cpus
        self._pool: Optional[ProcessPoolExecutor] = None
        self._local: Optional[tuple] = None  # the job's model and stats, handed to each worker as it starts

    def __enter__(self) -> "LocalJobs":
        return self

    def __exit__(self, *exc):
        self._close(stop=exc[0] is not None)
        return False

    # -- the pool -----------------------------------------------------------------------------------------
    def _open(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # What is allocated so far stays shared with the forked workers: the collector, which writes to
            # every object it visits, would copy those pages into each worker (gc.freeze's documented purpose)
            gc.freeze()
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_context(),
                                             initializer=_remember, initargs=(self._local, os.getpid()))
        return self._pool

    def _close(self, stop: bool = False) -> None:
        """Shut the pool down; ``stop`` (an error or Ctrl-C in the command): end the workers' running shards
        now (whatever they wrote is a temporary file that the next run removes, or a complete shard)."""
        if self._pool is None:
            return
        if stop:
            for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                process.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    # -- the job ------------------------------------------------------------------------------------------
    def start_encoders(self, run: RunConfig, stats=None) -> Encoders:
        """The model in the workers (shared with them where forked), with the CPU's cores split between the
        workers' torch threads."""
        if run.encode.device.startswith("cuda") or run.encoders is not None or run.inputs.decode == "gpu":
            raise ValueError("the local executor runs on CPUs only: GPUs, --encoders and --decode gpu need "
                             "--executor ray")
        encode_cfg = cpu_encode_config(run.encode, self.cpus, self.workers)
        self._local = (uuid.uuid4().hex, run.model, encode_cfg, stats)
        return Encoders([], self._local)

    def encoder_info(self, run: RunConfig, encoders: Encoders) -> dict:
        """The model's :meth:`EncodeStage.info`: built here once for the forked workers to share, or, where
        workers are spawned, loaded by every worker now, in parallel."""
        if FORK:
            import torch

            from pipeline.flow.stage import EncodeStage

            torch.set_num_threads(1)  # no OpenMP pool in the command: the forked workers start their own
            token, spec, encode_cfg, stats = self._local
            return EncodeStage.cached(token, spec, replace(encode_cfg, threads=1), stats).info()
        pool = self._open()
        futures = [pool.submit(_info) for _ in range(self.workers)]
        return [f.result() for f in futures][0]

    def run_shards(self, run: RunConfig, urls: list, encoders: Encoders, sink,
                   collector: Optional[Collector] = None, skipped: int = 0) -> JobReport:
        """Process ``urls`` with at most ``self.workers`` shards at once (see the module's docstring for
        retries and dead workers); ``collector`` sees the results in completion order."""
        collector = collector or Collector()
        queue = deque(enumerate(urls))
        suspects: deque = deque()  # shards that were running when a worker died: rerun alone
        attempts = [0] * len(urls)
        running: dict = {}
        report = JobReport(skipped=skipped)
        failed = report.failed
        started = time.time()

        def give_up_or_retry(i: int, url: str, error: str, again: deque) -> None:
            attempts[i] += 1
            if attempts[i] <= run.retries:
                log.debug("shard %s: attempt %d failed: %s", url, attempts[i], error)
                again.appendleft((i, url))
                return
            failed.append((url, error))
            collector.failed(i, url)
            bar.write(failure_line(run.retries, error, url))

        with Progress(total=len(urls) + skipped, initial=skipped, desc=sink.desc, enabled=run.progress) as bar:
            while (queue or suspects) and not collector.stop or running:
                pool = self._open()
                while not collector.stop and (suspects or queue):
                    if suspects:  # alone: whatever kills the worker now is this shard's doing
                        if running:
                            break
                        item = suspects.popleft()
                    elif len(running) < self.workers:
                        item = queue.popleft()
                    else:
                        break
                    running[pool.submit(_shard, item[1], shard_config(run, item[1]), sink)] = item
                if not running:
                    break
                ready, _ = wait(list(running), return_when=FIRST_COMPLETED)
                broken = [f for f in ready if isinstance(f.exception(), BrokenProcessPool)]
                if broken:
                    self._worker_died(running, suspects, give_up_or_retry)
                    continue
                for future in ready:
                    i, url = running.pop(future)
                    exc = future.exception()
                    if exc is not None:
                        log.debug("shard %s failed: %s", url, "".join(traceback.format_exception(exc)))
                        give_up_or_retry(i, url, describe_error(exc), queue)
                        continue
                    result = future.result()
                    report.add(result)
                    collector.add(i, url, result)
                    bar.update(1, samples=result["summary"]["rows"])
        report.elapsed = time.time() - started
        return report

    def _worker_died(self, running: dict, suspects: deque, give_up_or_retry) -> None:
        """A worker died and the pool with it: finished shards count, the others go to ``suspects``, except a
        shard that was running alone, which is charged an attempt."""
        wait(list(running))  # every future of a broken pool is finished, most with BrokenProcessPool
        alone = len(running) == 1
        for future, (i, url) in list(running.items()):
            exc = future.exception()
            if exc is None or not isinstance(exc, BrokenProcessPool):
                continue  # finished before the pool broke: handled by the caller's next wait
            del running[future]
            if alone:
                give_up_or_retry(i, url, "the worker process died while reading this shard (killed, out of "
                                         "memory, or a crash in a native library)", suspects)
            else:
                suspects.append((i, url))
        self._close()
