"""Live progress of a long stage on the driver: done/total, rate and ETA.

On a terminal it is a `tqdm` bar. Elsewhere (a log file, ``ray job logs``) it is one plain log
line at most every ``interval`` seconds and at the end, never carriage returns.

`FileCountWatcher` feeds it from files that finished work leaves behind (a zoo task's
``task.json``), for stages whose workers report only when a whole trainer is done.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("icm.progress")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class Progress:
    """``update(done)`` as work finishes; ``close()`` at the end (also a context manager)."""

    def __init__(self, label: str, total: int, unit: str, *, initial: int = 0,
                 interval: float = 30.0, stream=None):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.initial = self.done = initial  # work finished before this run (a resumed stage)
        self.started = self.last_line = time.monotonic()
        stream = stream or sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit=f" {unit}", file=stream,
                            dynamic_ncols=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        text = f"{self.label}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
        if rate > 0:
            text += f", {rate * 60:.1f}/min, ETA {_duration((self.total - self.done) / rate)}"
        return text

    def update(self, done: int) -> None:
        if done == self.done:
            return
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        now = time.monotonic()
        if self.bar is None and (now - self.last_line >= self.interval or done >= self.total):
            log.info(self.line())
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileCountWatcher:
    """A daemon thread that calls ``progress.update(count())`` every ``period`` seconds."""

    def __init__(self, progress: Progress, count: Callable[[], int], *, period: float = 10.0):
        self.progress, self.count, self.period = progress, count, period
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"progress-{progress.label}", daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(self.period):
            try:
                self.progress.update(self.count())
            except OSError:  # storage hiccup: the next poll tries again
                continue

    def __enter__(self) -> FileCountWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=self.period + 5)
        self.progress.update(self.count())
        self.progress.close()
