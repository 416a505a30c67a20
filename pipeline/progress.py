"""Progress display: a tqdm bar on a terminal, periodic plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger("wclip")


class Progress:
    """Counts units (shards) and samples; shows rate and ETA."""

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: Optional[bool] = None,
                 log_every: float = 30.0):
        self.total, self.desc, self.done, self.samples = total, desc, initial, 0
        self.initial = initial
        self.started = time.time()
        self.log_every = log_every
        self._last_log = self.started
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="shard", dynamic_ncols=True,
                            file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def rate(self) -> float:
        elapsed = time.time() - self.started
        return self.samples / elapsed if elapsed > 0 else 0.0

    def update(self, units: int = 1, samples: int = 0) -> None:
        self.done += units
        self.samples += samples
        if self.bar is not None:
            self.bar.update(units)
            self.bar.set_postfix(samples=f"{self.samples:,}", rate=f"{self.rate():,.0f}/s", refresh=False)
            return
        now = time.time()
        if now - self._last_log >= self.log_every or self.done == self.total:
            self._last_log = now
            new = self.done - self.initial
            left = self.total - self.done
            eta = (now - self.started) / new * left if new else float("nan")
            log.info("%s: %d/%d shards, %d samples, %.1f samples/s, ETA %.0fs",
                     self.desc, self.done, self.total, self.samples, self.rate(), eta)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.warning(message)
