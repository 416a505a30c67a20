"""The one loop every executor runs its tasks with: at most ``limit`` tasks in flight, retries, failures
recorded, progress shown, for shard jobs (:func:`run_job`) and file maps (:func:`map_items`) alike.

It is parameterised by how a backend submits a task (``submit(item) -> handle``) and by a :class:`Backend`
that waits (at most :data:`pipeline.progress.POLL_S` at a time) for any handle to finish, gives its result,
and says how many samples each running task has done so far (:meth:`Backend.live`: the shard tasks report
as they go, so the bar and the log lines move within a shard, not only when one ends):

* Ray (:mod:`pipeline.executors.ray`): ObjectRefs and ``ray.wait``. Ray retries a task itself
  (``max_retries``, system failures such as a lost node included), so the loop adds no attempts
  (:attr:`Backend.retries_itself`).
* local (:mod:`pipeline.executors.local`): futures of a thread pool (file maps) or of a process pool (shards);
  the loop retries a failed task (at the front of the queue). A process pool also has the dead-worker rule
  (:meth:`Backend.died`): a worker that dies takes the pool down with it, so the tasks that were running are
  not charged for it but rerun one at a time, and only a task that kills its worker when running alone uses
  up its attempts.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from typing import Callable, Optional

from pipeline.executors.contract import Collector, JobReport, Outcome, describe_error, failure_line, summary_rows
from pipeline.progress import POLL_S, Progress

log = logging.getLogger("wclip")


class Backend:
    """How :func:`run_tasks` waits for an executor's tasks (handles: futures, or Ray ObjectRefs)."""

    retries_itself = False  # True: the backend retries a failed task (Ray); the loop adds no attempts
    death = ""  # the error a task is charged with when it killed its worker running alone

    def wait_any(self, handles: list, timeout: float) -> list:
        """The handles among ``handles`` that have finished: at least one, or none after ``timeout`` s."""
        raise NotImplementedError

    def live(self, handles: list) -> dict:
        """``{handle: samples done so far}`` of the running ``handles`` that reported (none by default)."""
        return {}

    def result(self, handle):
        """The finished task's result; raises its error."""
        raise NotImplementedError

    def died(self, handle) -> bool:
        """Whether the finished task was ended by the death of a worker rather than by its own error."""
        return False

    def recover(self, handles: list) -> None:
        """After a worker died: wait for ``handles`` (all end when the pool breaks) and start afresh."""


def _never() -> bool:
    return False


def _ignore(running: dict) -> None:
    pass


def run_tasks(backend: Backend, submit: Callable, items: list, *, limit: int, retries: int,
              done: Callable, failed: Callable, stop: Callable[[], bool] = _never,
              tick: Callable[[dict], None] = _ignore) -> None:
    """Run ``submit(items[i])`` for every ``i``, at most ``limit`` at once, starting no more once ``stop()``;
    ``done(i, result)`` for each success, ``failed(i, error)`` for each task that failed after ``retries``
    more attempts (made here unless the backend retries itself); ``tick({i: samples done so far})`` of the
    running tasks every :data:`POLL_S` seconds, before the finished ones are handed over."""
    queue = deque(range(len(items)))
    alone: deque = deque()  # tasks that were running when a worker died: rerun one at a time
    attempts = [0] * len(items)
    own_retries = 0 if backend.retries_itself else retries
    running: dict = {}
    ticked = time.monotonic()

    def charge(i: int, error: str, again: deque) -> None:
        attempts[i] += 1
        if attempts[i] <= own_retries:
            log.debug("task %s: attempt %d failed: %s", _name(items, i), attempts[i], error)
            again.appendleft(i)
        else:
            failed(i, error)

    while (queue or alone) and not stop() or running:
        while not stop() and (alone or queue):
            if alone:  # by itself: whatever kills its worker now is this task's doing
                if running:
                    break
                i = alone.popleft()
            elif len(running) < limit:
                i = queue.popleft()
            else:
                break
            running[submit(items[i])] = i
        if not running:
            break
        ready = backend.wait_any(list(running), POLL_S)
        if time.monotonic() - ticked >= POLL_S:
            ticked = time.monotonic()
            still = [handle for handle in running if handle not in ready]
            tick({running[handle]: n for handle, n in backend.live(still).items()})
        if any(backend.died(handle) for handle in ready):
            _worker_died(backend, running, alone, charge)
            continue
        for handle in ready:
            i = running.pop(handle)
            try:
                result = backend.result(handle)
            except Exception as exc:  # recorded, the other tasks go on
                log.debug("task %s failed: %s", _name(items, i), traceback.format_exc())
                charge(i, describe_error(exc), queue)
                continue
            done(i, result)


def _name(items: list, i: int) -> str:
    """A task in a log line: its shard's URL, else its position (a file task's repr holds its stats)."""
    return items[i] if isinstance(items[i], str) else f"#{i}"


def _worker_died(backend: Backend, running: dict, alone: deque, charge: Callable) -> None:
    """A worker died and its pool with it: finished tasks count (the caller's next wait hands them over), the
    others go to ``alone``, except a task that was running by itself, which is charged an attempt."""
    backend.recover(list(running))
    by_itself = len(running) == 1
    for handle, i in list(running.items()):
        if not backend.died(handle):
            continue
        del running[handle]
        if by_itself:
            charge(i, backend.death, alone)
        else:
            alone.append(i)


def run_job(backend: Backend, submit: Callable, run, urls: list, sink, collector: Optional[Collector] = None,
            skipped: int = 0, *, limit: int) -> JobReport:
    """A shard job: :func:`run_tasks` over ``urls``, counted into a :class:`JobReport` as results arrive, with
    a progress bar of shards (``skipped`` already done) and samples; ``collector`` sees every result and may
    stop the job."""
    collector = collector or Collector()
    report = JobReport(skipped=skipped)
    started = time.time()
    with Progress(total=len(urls) + skipped, initial=skipped, desc=sink.desc, enabled=run.progress) as bar:
        def done(i: int, result: dict) -> None:
            report.add(result)
            collector.add(i, urls[i], result)
            bar.update(1, samples=summary_rows(result), key=i)

        def failed(i: int, error: str) -> None:
            report.failed.append((urls[i], error))
            collector.failed(i, urls[i])
            bar.write(failure_line(run.retries, error, urls[i]))
            bar.update(0, key=i)

        run_tasks(backend, submit, urls, limit=limit, retries=run.retries, done=done, failed=failed,
                  stop=lambda: collector.stop, tick=bar.running)
    report.elapsed = time.time() - started
    return report


def map_items(backend: Backend, submit: Callable, items: list, *, desc: str, limit: int, retries: int,
              progress: Optional[bool] = None, samples: Optional[Callable] = None) -> list:
    """A file map: :func:`run_tasks` over ``items``, an :class:`Outcome` per item in input order, a progress
    bar that counts failed items too (``samples(result)``: what a finished item adds to its samples)."""
    outcomes: list = [None] * len(items)
    with Progress(total=len(items), desc=desc, enabled=progress, unit="tasks", samples=samples is not None) as bar:
        def done(i: int, result) -> None:
            outcomes[i] = Outcome(items[i], True, result)
            bar.update(1, samples=samples(result) if samples else 0, key=i)

        def failed(i: int, error: str) -> None:
            outcomes[i] = Outcome(items[i], False, error=error)
            bar.write(failure_line(retries, error))
            bar.update(1, samples=0, key=i)

        run_tasks(backend, submit, items, limit=limit, retries=retries, done=done, failed=failed,
                  tick=bar.running)
    return outcomes
