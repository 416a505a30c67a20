"""The local executor (:mod:`pipeline.executors.contract`): a job's tasks on this machine, without Ray.
Tar shards run in worker processes, file tasks (embedding files, ``wclip filter``'s copy tasks) on threads.

Shards: the command imports torch and open_clip and builds the model once, with one torch thread (so no
OpenMP thread pool exists yet), then forks its workers (Linux): a worker starts in milliseconds and shares
the libraries and the model's weights with the command (inference never writes them), instead of every
worker loading its own copy; each then sets its own torch threads (one per worker when there are as many
workers as cores). Elsewhere the workers are spawned and each loads the model on its first task. Each shard
is one task, as on Ray: read, decode, encode, score and written by the worker
(:func:`pipeline.flow.stage.encode_shard`), so exactly one set of outputs per shard, written crash-safe.

Progress within a shard: each worker process shares one array of counters with the command (``RawArray``,
inherited at start); a shard task gets a free slot of it and writes there the samples it has done so far
(an 8-byte store per chunk: no lock, no pipe, nothing left half-written when a worker is killed), and the
loop reads the slots of the running tasks (:meth:`_Workers.live`).

Failures, as on Ray (the loop of :mod:`pipeline.executors.loop`): an exception in a task retries it
(``--retries``), then records it as failed. A worker that dies (killed, out of memory, a crash in a native
library) takes the pool down with it: the shards that were running are not charged for it but rerun one at
a time in a fresh pool, so only a shard that kills its worker when running alone uses up its attempts, and
no other shard fails because of it.

File tasks: threads of this process, which on one machine beat worker processes and Ray tasks
(docs/benchmarks.md: nothing to start, import or copy). Each gets one BLAS thread: ``threadpoolctl`` limits
NumPy's BLAS while the pool runs (two files each calling a 2-thread OpenBLAS ran 1.5x slower at d = 64 than
with one thread each).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import sys
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Callable, Optional

from pipeline.config import RunConfig
from pipeline.executors.contract import (
    Collector,
    Encoders,
    Executor,
    JobReport,
    cpu_encode_config,
    local_cpus,
    shard_config,
    usable_cpus,
)
from pipeline.executors.loop import Backend, map_items, run_job
from pipeline.progress import TaskReport

log = logging.getLogger("wclip")


LINUX = sys.platform.startswith("linux")
FORK = LINUX  # elsewhere fork is unsafe (macOS system libraries): spawn


def _context():
    return multiprocessing.get_context("fork" if FORK else "spawn")


_JOB: dict = {}  # in a worker: the job's (token, spec, encode config, stats) and the progress counters


def _remember(local: tuple, parent: int, counts) -> None:
    # Ctrl-C is the command's to handle (it stops the workers); a worker would only print a traceback. A
    # handler that does nothing, not SIG_IGN: an ignored signal stays ignored in the programs a worker starts
    # (`pipe:` commands), which must still stop on Ctrl-C
    signal.signal(signal.SIGINT, _ignore)
    _die_with(parent)
    _JOB["local"], _JOB["counts"] = local, counts
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


def _shard(url: str, run: RunConfig, sink, slot: int):
    from pipeline.flow import stage

    counts = _JOB["counts"]

    def send(n: int) -> None:
        counts[slot] = n

    # a store to shared memory per chunk costs nothing: no rate limit (every=0)
    return stage.encode_shard(url, run, _stage(), sink, report=TaskReport(send, every=0))


class _Futures(Backend):
    """Futures of a thread or process pool; the loop retries."""

    def wait_any(self, handles: list, timeout: float) -> list:
        return list(wait(handles, timeout=timeout, return_when=FIRST_COMPLETED).done)

    def result(self, handle):
        return handle.result()


class _Workers(_Futures):
    """Futures of the shard workers' process pool, whose death the loop survives (see the module)."""

    death = ("the worker process died while reading this shard (killed, out of memory, or a crash in a native "
             "library)")

    def __init__(self, executor: "LocalExecutor"):
        self.executor = executor

    def died(self, handle) -> bool:
        return isinstance(handle.exception(), BrokenProcessPool)

    def live(self, handles: list) -> dict:
        slots, counts = self.executor.slot_of, self.executor.counts
        return {handle: counts[slots[handle]] for handle in handles if handle in slots}

    def recover(self, handles: list) -> None:
        wait(handles)  # every future of a broken pool is finished, most with BrokenProcessPool
        self.executor.close_pool()  # the next task starts a fresh pool


def map_on_threads(fn: Callable, items: list, *, desc: str = "files", max_retries: int = 2,
                   max_in_flight: Optional[int] = None, progress: Optional[bool] = None,
                   samples: Optional[Callable] = None) -> list:
    """``fn(item)`` on threads of this process, at most ``max_in_flight`` at once (default: the CPUs), each
    retried ``max_retries`` times, one BLAS thread each; an :class:`pipeline.executors.contract.Outcome` per
    item, in input order (:func:`pipeline.executors.loop.map_items`)."""
    from threadpoolctl import threadpool_limits

    workers = max_in_flight or usable_cpus()
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wclip-task") as pool:
        return map_items(_Futures(), lambda item: pool.submit(fn, item), items, desc=desc, limit=workers,
                         retries=max_retries, progress=progress, samples=samples)


class LocalExecutor(Executor):
    """This machine for the ``with`` block: shard tasks in worker processes (started on the first shard),
    file tasks on threads. ``run``: the job's config (a RunConfig, EmbeddingRunConfig or FilterConfig)."""

    def __init__(self, run):
        self.run = run
        self.cpus = local_cpus(run.ray)
        self.workers = run.max_in_flight or self.cpus
        self._pool: Optional[ProcessPoolExecutor] = None
        self._local: Optional[tuple] = None  # the job's model and stats, handed to each worker as it starts
        self.counts = _context().RawArray("q", self.workers)  # samples done so far, a slot per running shard
        self.slot_of: dict = {}  # shard task (future) -> its slot of ``counts``

    def __exit__(self, *exc):
        self.close_pool(stop=exc[0] is not None)
        return False

    @property
    def slots(self) -> int:
        return self.workers

    # -- the pool -----------------------------------------------------------------------------------------
    def _open(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # What is allocated so far stays shared with the forked workers: the collector, which writes to
            # every object it visits, would copy those pages into each worker (gc.freeze's documented purpose)
            gc.freeze()
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_context(),
                                             initializer=_remember, initargs=(self._local, os.getpid(), self.counts))
        return self._pool

    def close_pool(self, stop: bool = False) -> None:
        """Shut the pool down; ``stop`` (an error or Ctrl-C in the command): end the workers' running shards
        now (whatever they wrote is a temporary file that the next run removes, or a complete shard)."""
        if self._pool is None:
            return
        if stop:
            for process in list((getattr(self._pool, "_processes", None) or {}).values()):
                process.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    # -- shard jobs ---------------------------------------------------------------------------------------
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
        def submit(url: str):
            slot = self._free_slot()
            self.counts[slot] = 0
            future = self._open().submit(_shard, url, shard_config(run, url), sink, slot)
            self.slot_of[future] = slot
            return future

        return run_job(_Workers(self), submit, run, urls, sink, collector, skipped, limit=self.workers)

    def _free_slot(self) -> int:
        """A slot of :attr:`counts` no running shard task writes to (a finished task writes no more; the
        loop runs at most :attr:`workers` at once)."""
        for future in [f for f in self.slot_of if f.done()]:
            del self.slot_of[future]
        return min(set(range(self.workers)) - set(self.slot_of.values()))

    # -- file maps ----------------------------------------------------------------------------------------
    def map(self, fn, items: list, desc: str = "tasks", *, samples=None, max_retries: Optional[int] = None,
            max_in_flight: Optional[int] = None, progress: Optional[bool] = None) -> list:
        return map_on_threads(fn, items, desc=desc, samples=samples,
                              max_retries=self.run.retries if max_retries is None else max_retries,
                              max_in_flight=max_in_flight or self.workers,
                              progress=self.run.progress if progress is None else progress)
