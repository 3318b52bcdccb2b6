"""`prism-ray submit | status | logs | stop | jobs`: jobs on a Ray cluster through the Job Submission SDK.

The config travels inline. It is resolved and validated on the submitting machine (a config error
exits 2 and never reaches the cluster); the resolved YAML goes into the job's runtime_env as the
env var PRISM_RAY_CONFIG, and the entrypoint writes it into the job's working directory before
running `python jobs/<job>.py --config <that file>`. Config files that are git-ignored or outside
the repo therefore reach the cluster, and the job runs exactly the config that was checked and
hashed. Paths *inside* the config must be reachable from the cluster (`cluster_env.check_cluster_paths`
refuses, before anything is uploaded, what cannot be); the job runs in cluster/runtime_env.yaml's
environment plus compute.env_vars.

The submission id is `prism-<job>-<config_hash>`: the same config again attaches to the running or
finished job; after a FAILED or STOPPED one it submits `...-2`, `...-3`; exit codes follow the job.

Token auth (Ray >= 2.52; a plain `ray start --head` turns it on when ~/.ray/auth_token exists, which
any local `ray.init()` writes): we send the header ourselves, the token found where Ray looks for
it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); one we lack is one line saying how.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from prism_ray.distributed import verbose
from prism_ray.distributed.cluster_env import (
    REPO,
    check_cluster_paths,
    entrypoint,
    job_env_vars,
    job_metadata,
    runtime_env,
)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Where Ray keeps its token (ray._private.authentication.authentication_token_setup._get_default_token_path).
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused a request; the message is one line."""


def auth_token() -> tuple[str, str]:
    """(token, where it came from) in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token;
    ("", "") when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip(), f"RAY_AUTH_TOKEN_PATH '{path}'"
        except OSError as err:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH '{path}': {err.strerror}") from None
    try:
        return DEFAULT_TOKEN_PATH.expanduser().read_text().strip(), str(DEFAULT_TOKEN_PATH)
    except OSError:  # no token file: a cluster without auth needs none
        return "", ""


def connect(address: str | None) -> JobSubmissionClient:
    """A client for `address`, else RAY_ADDRESS, else the local dashboard; sends the token if there is one."""
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    token, source = auth_token()
    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else {})
    except AuthenticationError:
        if token:
            raise SubmitError(f"Ray dashboard at {address}: the token from {source} was refused; "
                              "set RAY_AUTH_TOKEN to the cluster's token") from None
        raise SubmitError(f"Ray dashboard at {address}: the cluster wants a token; set RAY_AUTH_TOKEN "
                          f"(or RAY_AUTH_TOKEN_PATH, or write it to {DEFAULT_TOKEN_PATH}; "
                          "`ray get-auth-token` on the head prints it)") from None
    except (ConnectionError, RuntimeError) as err:
        raise SubmitError(f"Ray dashboard at {address}: {_first_line(err)}") from None


def _name(status) -> str:
    return getattr(status, "value", str(status))


def _first_line(text) -> str:
    """First line of a message or an exception (its type name when it has no message)."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else (type(text).__name__ if isinstance(text, BaseException) else "")


def _request(what: str, call, *args):
    """Run one SDK call; its errors (HTTP status, connection) become one SubmitError line."""
    try:
        return call(*args)
    except AuthenticationError as err:  # its str() appends a paragraph of help
        raise SubmitError(f"{what}: {_first_line(err.message)}") from None
    except (ConnectionError, RuntimeError) as err:
        raise SubmitError(f"{what}: {_first_line(err)}") from None


def submission_id(job: str, config_hash: str, taken: dict[str, JobStatus]) -> tuple[str, bool]:
    """(id, exists): the first `prism-<job>-<hash>[-n]` that is not a FAILED/STOPPED job."""
    base = f"prism-{job}-{config_hash}"
    for n in range(1, 1000):
        sid = base if n == 1 else f"{base}-{n}"
        status = taken.get(sid)
        if status is None:
            return sid, False
        if status not in (JobStatus.FAILED, JobStatus.STOPPED):
            return sid, True
    raise SubmitError(f"{base}: 999 failed submissions of this config")


def submit(job: str, config, address: str | None = None, wait: bool = True,
           config_paths: Sequence[str] = (), overrides: Sequence[str] = ()) -> int:
    """Submit or attach to the job of a validated `config`, follow it unless not `wait`; bad paths: ConfigError."""
    script = REPO / "jobs" / f"{job.replace('-', '_')}.py"
    if not script.is_file():
        raise SubmitError(f"jobs/{script.name}: not found under {REPO} (submit from a repo checkout)")
    for name in ("ray", "ray.dashboard.modules.job.sdk"):  # "Ignoring upload ...", "WebSocket closed ..." (own level)
        logging.getLogger(name).setLevel(logging.INFO if verbose() else logging.ERROR)
    client = connect(address)
    env_vars = job_env_vars(config)
    check_cluster_paths(config, env_vars)
    jobs = _request("list jobs", client.list_jobs)
    taken = {j.submission_id: j.status for j in jobs if j.submission_id}
    sid, exists = submission_id(job, config.config_hash(), taken)
    if exists:
        print(f"prism-ray submit: {sid} is already {_name(taken[sid])}; attaching", file=sys.stderr)
    else:
        _request(f"submit {sid}", lambda: client.submit_job(
            entrypoint=entrypoint(job, sid), submission_id=sid,
            runtime_env=runtime_env(config.to_yaml(), env_vars),
            metadata=job_metadata(job, config_paths, overrides)))
        print(f"prism-ray submit: submitted {sid}", file=sys.stderr)
    if not wait:
        print(sid)
        return 0
    follow(client, sid)
    return _finish(client, sid)


def _finish(client: JobSubmissionClient, sid: str) -> int:
    """Exit code of a finished job, with one line on stderr when it did not succeed."""
    info = _wait_terminal(client, sid)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    reason = _reason(client, sid, info)
    code = info.driver_exit_code
    print(f"prism-ray submit: {sid} {_name(info.status)}" + (f" (exit {code})" if code is not None else "")
          + f": {reason}", file=sys.stderr)
    shortfall = code == 3 or (code is None and " incomplete:" in reason)
    return 3 if info.status == JobStatus.FAILED and shortfall else 1


def _reason(client: JobSubmissionClient, sid: str, info) -> str:
    """Why a job did not succeed: its own error line from the logs, else the first line of Ray's message
    (for a FAILED job that line only announces the log tail: "..., last available logs (...):")."""
    logs = _request(f"logs of {sid}", client.get_job_logs, sid)
    return _error_line(logs) or _first_line(info.message or "")


def _error_line(logs: str) -> str:
    """The job's own one-line error (`prism-ray <job>: ...`), else the last non-empty log line."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("prism-ray ")]
    return (ours or lines or [""])[-1]


def _wait_terminal(client: JobSubmissionClient, sid: str, poll_s: float = 1.0):
    while True:
        info = _request(f"status of {sid}", client.get_job_info, sid)
        if info.status in TERMINAL:
            return info
        time.sleep(poll_s)


def follow(client: JobSubmissionClient, sid: str) -> None:
    """Print the job's logs as they come, until it ends. The stream can close before the last
    lines arrive (or drop): the rest comes from the stored logs once the job has ended."""
    shown = 0

    async def tail() -> None:
        nonlocal shown
        async for chunk in client.tail_job_logs(sid):
            print(chunk, end="", flush=True)
            shown += len(chunk)

    try:
        asyncio.run(tail())
    except (ConnectionError, RuntimeError, OSError):
        pass
    while True:  # status first: logs read after a terminal status are complete
        info = _request(f"status of {sid}", client.get_job_info, sid)
        logs = _request(f"logs of {sid}", client.get_job_logs, sid)
        print(logs[shown:], end="", flush=True)
        shown = max(shown, len(logs))
        if info.status in TERMINAL:
            return
        time.sleep(1.0)


# --- the small commands ----------------------------------------------------------------------


def status(sid: str, address: str | None = None) -> int:
    client = connect(address)
    info = _request(f"status of {sid}", client.get_job_info, sid)
    code = "" if info.driver_exit_code is None else f" (exit {info.driver_exit_code})"
    failed = info.status == JobStatus.FAILED
    reason = _reason(client, sid, info) if failed else _first_line(info.message or "")
    print(f"{sid} {_name(info.status)}{code}: {reason}")
    return 0


def logs(sid: str, address: str | None = None, follow_logs: bool = False) -> int:
    client = connect(address)
    if follow_logs:
        follow(client, sid)
    else:
        print(_request(f"logs of {sid}", client.get_job_logs, sid), end="")
    return 0


def stop(sid: str, address: str | None = None) -> int:
    stopped = _request(f"stop {sid}", connect(address).stop_job, sid)
    print(f"{sid}: {'stop requested' if stopped else 'already finished'}")
    return 0


def list_jobs(address: str | None = None) -> int:
    jobs = _request("list jobs", connect(address).list_jobs)
    jobs = sorted(jobs, key=lambda j: j.start_time or 0)
    print(f"{'ID':<40} {'STATUS':<10} {'STARTED':<19} JOB")
    for j in jobs:
        started = datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if j.start_time else "-"
        shown = (j.metadata or {}).get("prism_command") or j.entrypoint  # ours: the job, not its wrapper
        print(f"{j.submission_id or j.job_id or '-':<40} {_name(j.status):<10} {started:<19} {shown}")
    return 0
