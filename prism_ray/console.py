"""What a job prints: the `prism_ray` logger's own handler and a progress heartbeat for long stages.

Ray's `LoggingConfig` (which `distributed.init_ray` passes to silence Ray's INFO lines) sets the
*root* logger of the driver and of every worker to its level and adds a second handler to it. A
job's lines therefore go through a handler of their own on the `prism_ray` logger, which does not
propagate: Ray can change the root logger as it likes, and no line is printed twice.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

LOGGER = "prism_ray"
EVERY_ENV = "PRISM_RAY_PROGRESS_SECONDS"  # the heartbeat's period (default 10 s; tests shorten it)
_HANDLER_NAME = "prism_ray.console"

log = logging.getLogger(LOGGER)


def configure_logging(verbose: bool = False) -> None:
    """`prism_ray.*` INFO lines (DEBUG if `verbose`) to stderr as bare messages; idempotent.

    Called by the CLI and by every Ray worker that prints progress (actors, train workers), so the
    same lines reach the driver's terminal whichever process wrote them.
    """
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False  # the root logger belongs to Ray (and to the user's own code)
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def _seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """A progress line every `every` seconds while a long stage runs: `label: done/total unit, elapsed, ETA`.

    Use as a context manager around the stage and call `advance(n)` as work finishes; a daemon thread
    writes the line, so a stage whose first result takes minutes (a Ray start, a model load, the first
    batch of null-text inversions) still says that it is alive. `detail()` adds a tail (e.g. per
    subgroup counts). With `total=None` the line gives the elapsed time only.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "", *, every: float | None = None,
                 detail: Callable[[], str] | None = None, emit: Callable[[str], None] | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.every = every if every is not None else float(os.environ.get(EVERY_ENV, "10"))
        self.detail = detail
        self.emit = emit or log.info
        self.done = 0
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def advance(self, n: int = 1) -> None:
        self.done += n

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        parts = [f"{self.label}:"]
        if self.total is not None:
            unit = f" {self.unit}" if self.unit else ""
            parts.append(f"{self.done}/{self.total}{unit},")
        parts.append(f"{_seconds(elapsed)} elapsed")
        if self.total is not None:
            if self.done and self.done < self.total:
                parts[-1] += ","
                parts.append(f"ETA {_seconds(elapsed / self.done * (self.total - self.done))}")
            elif not self.done:
                parts[-1] += ", ETA after the first result"
        text = " ".join(parts)
        tail = self.detail() if self.detail is not None else ""
        return f"{text} | {tail}" if tail else text

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.emit(self.line())

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"progress:{self.label}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
