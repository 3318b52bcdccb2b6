"""Ray and DeepSpeed adapters: the only modules that import them, each a short wrapper over the core."""

from __future__ import annotations

import logging
import os
import re

VERBOSE_ENV = "PRISM_RAY_VERBOSE"  # set by `prism-ray -v`: Ray's own INFO lines and progress bars back on

# Lines Ray forwards from its workers that are Ray's, DeepSpeed's or torch's business, not the user's:
# dropped from the driver's terminal (they stay in the session's log files) unless PRISM_RAY_VERBOSE.
_WORKER_NOISE = re.compile(
    r"core_worker\.cc:\d+: Actor with class name: '\w+' and ID: \S+ has constructor arguments"
    r"|DeepSpeed deepspeed\.ops\.\S+ built successfully"
    r"|\[[\w.]+\] \[INFO\] \[[\w.]+:\d+:\w+\]"  # DeepSpeed's INFO logger lines
    # Ray Train logs these per rank and report through a logger named by file path, which its own
    # log level does not reach; Ray Data warns once per worker that we turned its progress bars off.
    r"|^Reporting training result \d+: TrainingReport\("
    r"|^Checkpoint successfully created at: Checkpoint\("
    r"|^Progress bars disabled\. To enable, set"
)


class RayStartError(RuntimeError):
    """Ray could not be started here or the cluster of RAY_ADDRESS could not be joined (one line: why)."""


class WorkerOutOfMemory(RuntimeError):
    """Ray killed a job's worker because its node ran out of memory (one line: where, how much, what to change)."""


_NODE_MEMORY = re.compile(r"Memory on the node \(IP: ([\d.]+)[^)]*\) was ([\d.]+GB) used / ([\d.]+GB) limit")


def out_of_memory(job: str, err: BaseException, advice: str) -> WorkerOutOfMemory | None:
    """A `WorkerOutOfMemory` for `err` if Ray's memory monitor caused it (anywhere in its chain), else None."""
    seen, e = [], err
    while e is not None and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(f"{type(e).__name__}: {e}" for e in seen)
    if "OutOfMemoryError" not in text and "running low on memory" not in text:
        return None
    match = _NODE_MEMORY.search(text)
    where = f" (node {match[1]}: {match[2]} used of {match[3]})" if match else ""
    return WorkerOutOfMemory(f"{job}: Ray killed a worker for lack of memory{where}; {advice}")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise RayStartError at once when nothing listens at RAY_ADDRESS's host:port (ray.init would retry the
    connection for minutes); 'auto', 'local' and addresses without a port are left to ray.init."""
    import socket

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise RayStartError(
            f"RAY_ADDRESS={address}: nothing answers at {host}:{port} ({err.strerror or err}); start the head "
            "(`ray start --head`) or unset RAY_ADDRESS to run on a local Ray"
        ) from None


def verbose() -> bool:
    return bool(os.environ.get(VERBOSE_ENV))


def quiet_worker_environment() -> dict[str, str]:
    """Environment for Ray workers of a quiet run: Ray Data at WARNING, no deprecation/future warnings."""
    if verbose():
        return {}
    return {"RAY_DATA_LOG_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}


def _filter_worker_lines() -> None:
    """Wrap the driver's handler of forwarded worker output so that `_WORKER_NOISE` lines are dropped."""
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    original = dict(getattr(dispatcher, "handlers", [])).get("ray_print_logs")  # [(name, handler)]
    if original is None or getattr(original, "prism_ray_filtered", False):
        return  # not a Ray this was written against, or already wrapped: print everything

    def filtered(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not _WORKER_NOISE.search(line)]
        if lines:
            original(dict(data, lines=lines))

    filtered.prism_ray_filtered = True
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start a local Ray.

    Workers' prints (the jobs' progress lines) reach the driver; Ray's own INFO logging, Ray Data's
    progress bars and the library noise of `_WORKER_NOISE` do not, unless PRISM_RAY_VERBOSE is set.
    The job's own lines go through the `prism_ray` logger's handler (`console.configure_logging`),
    which the `LoggingConfig` here (applied by Ray to the root logger) does not touch.
    """
    import ray

    # Ray Train tees workers' prints into its logger as well: every progress line would show twice.
    # (Local workers inherit this; a cluster gets it from cluster/runtime_env.yaml.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    for key, value in quiet_worker_environment().items():  # a local Ray's workers inherit the driver's env
        os.environ.setdefault(key, value)
    if not verbose():
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if not os.environ.get("RAY_ADDRESS"):  # an in-process Ray on this machine: its token is Ray's business
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True,
                     logging_config=ray.LoggingConfig(log_level="INFO" if verbose() else "WARNING"))
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:  # Ray's start/join failures
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RayStartError(f"Ray did not start ({address or 'a local Ray'}): {first}") from None
        if not verbose():
            _filter_worker_lines()
