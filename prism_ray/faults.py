"""Test-only fault injection: named points in the jobs that die or raise when a test asks them to.

Nothing here is a user setting. A test switches points on with the environment variable
`PRISM_RAY_FAULTS` (it reaches Ray workers through `ray.init(runtime_env={"env_vars": ...})`),
a comma-separated list of `point=action`:

  exit       the process exits hard (`os._exit(1)`), like an OOM kill or a lost node
  interrupt  raises `InjectedFault` (a BaseException: no `except Exception` catches it), to stop a
             driver in the middle of a step inside one test process
  oom        raises `torch.OutOfMemoryError` (a transient resource error)
  enospc     raises `OSError(ENOSPC)` (a storage error)

An action may carry `@N`: fire at the N-th time the point is reached in this process (default 1).
With `PRISM_RAY_FAULTS_ONCE=<folder>` every point fires once per folder across processes (an
exclusive marker file), so a retried task or a restarted worker does not die again.
"""

from __future__ import annotations

import errno
import os
from collections import Counter

ENV = "PRISM_RAY_FAULTS"
ONCE_ENV = "PRISM_RAY_FAULTS_ONCE"

_reached: Counter = Counter()


class InjectedFault(BaseException):
    """Raised by an `interrupt` fault point: a stand-in for a killed process inside one test."""


def _plan() -> dict[str, tuple[str, int]]:
    plan = {}
    for item in filter(None, (p.strip() for p in os.environ.get(ENV, "").split(","))):
        point, _, action = item.partition("=")
        action, _, nth = action.partition("@")
        plan[point] = (action or "exit", int(nth or 1))
    return plan


def _claim(point: str) -> bool:
    """True once per (point, marker folder) across processes; always True without a marker folder."""
    folder = os.environ.get(ONCE_ENV)
    if not folder:
        return True
    os.makedirs(folder, exist_ok=True)
    try:
        with open(os.path.join(folder, f"{point}.fired"), "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        return False
    return True


def fault_point(point: str) -> None:
    """Do what the test asked at `point`, if anything (a dictionary lookup when no test asked)."""
    if ENV not in os.environ:
        return
    action = _plan().get(point)
    if action is None:
        return
    _reached[point] += 1
    kind, nth = action
    if _reached[point] != nth or not _claim(point):
        return
    if kind == "exit":
        os._exit(1)
    if kind == "interrupt":
        raise InjectedFault(point)
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"injected at {point}")
    if kind == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {point})")
    raise ValueError(f"{ENV}: unknown action {kind!r} for point {point!r}")


def reset() -> None:
    """Forget how often each point was reached (tests that run several jobs in one process)."""
    _reached.clear()
