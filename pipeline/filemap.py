"""Where file-sized tasks run (:mod:`pipeline.executor`), the embeddings jobs' files and ``wclip filter``'s
copy tasks: the local executor runs them on threads of this process (:func:`map_on_threads`), the Ray
executor as one Ray task each (:func:`pipeline.runtime.map_tasks`).
Both take the same function and tasks and give back one :class:`pipeline.executor.Outcome` per task, in
input order, after retries.

Measured on one machine (docs/benchmarks.md), threads are faster: no Ray to start, no worker processes to
import the code, nothing copied between processes. Either way each file gets one BLAS thread: on threads
``threadpoolctl`` limits NumPy's BLAS while the pool runs (two files each calling a 2-thread OpenBLAS ran
1.5x slower at d = 64 than with one thread each); on Ray each task has one (Ray sets ``OMP_NUM_THREADS`` to the
task's CPUs, which OpenBLAS and MKL follow).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from pipeline.executor import Outcome, describe_error, failure_line, local_cpus, usable_cpus, uses_ray
from pipeline.progress import Progress


@dataclass
class Runner:
    """A started place to run files: ``map(fn, tasks, desc) -> [Outcome]``, ``slots`` at once."""

    map: Callable
    slots: int


@contextlib.contextmanager
def file_runner(run) -> Iterator[Runner]:
    """A :class:`Runner` whose ``map`` runs ``fn(task)`` for every task, at most ``run.max_in_flight`` at once
    (default: the CPUs), each retried ``run.retries`` times."""
    if uses_ray(run):
        from pipeline import runtime

        def on_ray(fn, tasks, desc):
            return runtime.map_tasks(fn, tasks, desc=desc, max_retries=run.retries,
                                     max_in_flight=run.max_in_flight, progress=run.progress, samples=rows)

        with runtime.ray_session(run.ray):
            yield Runner(on_ray, run.max_in_flight or runtime.cluster_cpus())
        return
    workers = run.max_in_flight or local_cpus(run.ray)

    def on_threads(fn, tasks, desc):
        return map_on_threads(fn, tasks, desc=desc, max_retries=run.retries, max_in_flight=workers,
                              progress=run.progress, samples=rows)

    yield Runner(on_threads, workers)


def rows(result: dict) -> int:
    """The samples a finished file counts on the progress bar."""
    return result["summary"]["rows"]


def map_on_threads(fn: Callable, items: list, *, desc: str = "files", max_retries: int = 2,
                   max_in_flight: Optional[int] = None, progress: Optional[bool] = None,
                   samples: Optional[Callable] = None) -> list:
    """:func:`pipeline.runtime.map_tasks` without Ray: ``fn(item)`` on threads of this process, at most
    ``max_in_flight`` at once (default: the CPUs), each retried ``max_retries`` times, one BLAS thread each;
    an :class:`pipeline.executor.Outcome` per item, in input order."""
    from threadpoolctl import threadpool_limits

    workers = max_in_flight or usable_cpus()
    outcomes: list = [None] * len(items)
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wclip-task") as pool, \
            Progress(total=len(items), desc=desc, enabled=progress) as bar:
        futures = {pool.submit(_attempts, fn, item, max_retries): i for i, item in enumerate(items)}
        for future in as_completed(futures):
            i = futures[future]
            ok, value = future.result()
            outcomes[i] = Outcome(items[i], ok, value if ok else None, None if ok else value)
            bar.update(1, samples=samples(value) if ok and samples else 0)
            if not ok:
                bar.write(failure_line(max_retries, value))
    return outcomes


def _attempts(fn, task, retries: int) -> tuple:
    """``(True, fn(task))``, or ``(False, the last error)`` after ``retries`` more attempts."""
    error = ""
    for _ in range(retries + 1):
        try:
            return True, fn(task)
        except Exception as exc:  # recorded, the other files go on
            error = describe_error(exc)
    return False, error
