"""Progress display: a tqdm bar on a terminal, periodic plain log lines otherwise (:class:`Progress`, in the
driver); and what a running task says about its progress (:class:`TaskReport`, in the task).

A shard task reports the samples it has done so far (an absolute count, so a lost or late message, or a
retried attempt that starts again from 0, never leaves a wrong total behind); the executor carries the
counts to the driver (:mod:`pipeline.executors`: a shared-memory slot per running task locally, a small
actor on Ray), whose loop hands those of the running tasks to :meth:`Progress.running` every
:data:`POLL_S` seconds. Every line counts what was done: finished shards, samples of finished shards plus
samples done so far by running ones, and their rate.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable, Optional

log = logging.getLogger("wclip")

LOG_EVERY_S = 15.0  # without a terminal: a progress line at least this often while a job runs
POLL_S = 0.5  # the driver collects the running tasks' counts (and refreshes the bar) this often
REPORT_EVERY_S = 0.5  # a task sends its count at most this often


class Progress:
    """Counts units (shards, tasks) and samples; shows samples/s and the ETA. ``samples``: whether the
    units have samples to count (a map of tasks without them shows units only)."""

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: Optional[bool] = None,
                 log_every: Optional[float] = None, unit: str = "shards", samples: bool = True):
        self.total, self.desc, self.done, self.samples = total, desc, initial, 0
        self.initial, self.unit, self.counts_samples = initial, unit, samples
        self.live: dict = {}  # task key -> samples done so far by a task still running
        self.started = time.time()
        self.log_every = LOG_EVERY_S if log_every is None else log_every
        self._last_log = self.started
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit.rstrip("s") or unit,
                            dynamic_ncols=True, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def samples_done(self) -> int:
        """Samples of the finished units plus those done so far by the running ones."""
        return self.samples + sum(self.live.values())

    def rate(self) -> float:
        elapsed = time.time() - self.started
        return self.samples_done() / elapsed if elapsed > 0 else 0.0

    def update(self, units: int = 1, samples: int = 0, key=None) -> None:
        """``units`` more finished with ``samples``; ``key``: the finished task, whose running count goes."""
        self.live.pop(key, None)
        self.done += units
        self.samples += samples
        if self.bar is not None:
            self.bar.update(units)
        self._show(final=self.done == self.total)

    def running(self, counts: dict) -> None:
        """The samples done so far by each running task (task key -> count), in place of the last ones."""
        self.live = dict(counts)
        self._show()

    def _show(self, final: bool = False) -> None:
        if self.bar is not None:
            if self.counts_samples:
                self.bar.set_postfix(samples=f"{self.samples_done():,}", rate=f"{self.rate():,.0f}/s",
                                     refresh=False)
            self.bar.refresh()
            return
        now = time.time()
        if final or now - self._last_log >= self.log_every:
            self._last_log = now
            log.info("%s", self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        """The log line: units done, samples done, samples/s, and the ETA once a unit of this run finished."""
        now = time.time() if now is None else now
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}"
        if self.counts_samples:
            text += f", {self.samples_done()} samples, {self.rate():.1f} samples/s"
        new, left = self.done - self.initial, self.total - self.done
        if new and left:
            text += f", ETA {math.ceil((now - self.started) / new * left)}s"
        return text

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.warning(message)


class TaskReport:
    """In a task: ``report(n)`` (``n``: the samples the task has done so far) passes ``n`` on to
    ``send`` at most every ``every`` seconds (the first at once). Cheap enough to call per chunk."""

    def __init__(self, send: Callable[[int], None], every: Optional[float] = None):
        self.send = send
        self.every = REPORT_EVERY_S if every is None else every
        self._last = -math.inf

    def __call__(self, n: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self.send(n)
