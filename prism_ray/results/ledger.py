"""The resumable ledger every job writes through: batch parts, atomic commits, nothing finished ever deleted.

Protocol (one output folder, see `Layout`):
1. A worker writes its outputs (PNGs) first, then one ledger *part* per batch, atomically (a
   temporary name, then a rename): a killed worker leaves outputs without rows, never half a part.
   Those outputs are redone under the same deterministic ids.
2. `read_state` loads the committed tables plus every part. A part or table that cannot be read
   stops the job with one line naming it (after retrying storage errors): it is never deleted,
   because it may hold finished work.
3. `commit` writes the new manifest and errors tables under temporary names and switches each
   into place; the previous table stays valid until its switch. Only then are the parts it
   consumed removed. A crash anywhere leaves a state the next `read_state` finishes the same way.
4. A job probes its output before any compute (`check_writable`), and a write the output itself
   refuses (read-only, full, over quota, no permission) ends the job in one line naming the path
   (`OutputWriteError`), where other storage errors are retried: a full disk stays full.
"""

from __future__ import annotations

import errno
import logging
import posixpath
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from prism_ray.faults import fault_point
from prism_ray.results.layout import Layout

log = logging.getLogger("prism_ray.results")

TMP_MARK = ".tmp-"  # temporary files being written; never read as results


class LedgerError(RuntimeError):
    """The output folder holds something the job cannot read; nothing was deleted."""


class OutputWriteError(LedgerError):
    """The output refuses writes (`OUTPUT_WRITE_ERRNOS`): the job stops naming the path, no batch retried."""


# What a write to the output answers when the output itself is the problem: retrying cannot help.
OUTPUT_WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM})


def _describe(err: OSError) -> str:
    """'ENOSPC: No space left on device' (the errno's name, or the class without one)."""
    return f"{errno.errorcode.get(err.errno, type(err).__name__)}: {err.strerror or err}"


def output_write_error(err: BaseException, uri: str) -> OutputWriteError | None:
    """`err` as an OutputWriteError naming `uri` when the output refused the write; None otherwise
    (a lost connection, say, stays a storage error the runtime retries)."""
    if not isinstance(err, OSError) or err.errno not in OUTPUT_WRITE_ERRNOS:
        return None
    return OutputWriteError(
        f"cannot write '{uri}' ({_describe(err)}); not retried: free space or make the output writable, "
        "then run the job again (finished work is kept)"
    )


def check_writable(layout: Layout) -> None:
    """Create the output folder, then write and remove a probe file in it: an output that cannot be
    written ends the job here, in one line naming it, before any compute. (Found at the first result
    instead, every batch would be computed and retried before the job gave up.)"""
    fs, root = layout.fs()
    probe = f"{root}/.write-probe{TMP_MARK}{uuid.uuid4().hex[:12]}"  # never read as a result
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"prism-ray: can this output be written?\n")
        fs.rm(probe)
    except OSError as err:
        raise OutputWriteError(
            f"output '{layout.root}' cannot be written ({_describe(err)}); nothing was computed"
        ) from None


class OutputGuard:
    """A job's per-batch step (`step_factory(**kwargs)`) whose writes the output refuses end the job as
    an `OutputWriteError` naming the file, instead of reaching the runner as a storage error it would
    retry (`pipelines.counterfactuals.is_transient`). Any runner builds it the way it builds the step."""

    def __init__(self, step_factory, root: str, **kwargs):
        self.step = step_factory(**kwargs)
        self.root = root

    @property
    def model_loads(self) -> int:
        return self.step.model_loads

    def __call__(self, batch):
        try:
            return self.step(batch)
        except OSError as err:
            where = err.filename if isinstance(err.filename, str) else None
            _, root = Layout(self.root).fs()
            if where is not None and not (where == root or where.startswith(root.rstrip("/") + "/")):
                raise  # not the output's file (a model cache, say): the runner decides
            failed = output_write_error(err, where or self.root)
            if failed is None:
                raise
            raise failed from err


def _retrying(what: str, fn, retries: int, wait: float):
    """`fn()` with retries on storage errors (OSError except a missing file); other errors pass through."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as err:
            if attempt == retries:
                raise LedgerError(f"{what}: storage error after {retries + 1} tries: {err}") from err
            time.sleep(wait * 2**attempt)


def write_atomic(uri: str, write, fault: str = "table.write") -> None:
    """Call `write(binary file)` on a temporary name beside `uri`, then switch it into place: a reader
    never sees half a file, and a failure (or a killed process) leaves at most a temporary file, which
    no reader takes for a result. A write the output refuses raises `OutputWriteError` naming `uri`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            write(f)
        fault_point(fault)  # tests: a full disk or a killed process mid-write
        fs.mv(tmp, path)  # local: os.rename, atomic; object stores: one whole-object put
    except BaseException as err:
        try:
            fs.rm(tmp)
        except OSError:
            pass
        failed = output_write_error(err, uri)
        if failed is not None:
            raise failed from err
        raise


def write_table_atomic(table: pa.Table, uri: str, fault: str = "table.write") -> None:
    """Write a Parquet table under a temporary name beside `uri`, then switch it into place.

    Until the switch a reader sees the previous file (or none); a failed write (ENOSPC, a killed
    process) leaves at most a temporary file, which no reader takes for a result.
    """
    write_atomic(uri, lambda f: pq.write_table(table, f), fault)


def write_json_atomic(data: dict, uri: str) -> None:
    """A JSON document, switched into place like a table."""
    import json

    write_atomic(uri, lambda f: f.write(json.dumps(data, indent=2, default=str).encode()), "json.write")


def write_part(layout: Layout, kind: str, name: str, table: pa.Table) -> None:
    """One batch's rows (`kind` = 'rows' or 'errors'); a retried batch rewrites its own part."""
    write_table_atomic(table, layout.ledger(kind, name), fault="ledger.write")


@dataclass
class LedgerState:
    """Everything finished in an output folder: committed tables plus uncommitted parts."""

    rows: list[dict] = field(default_factory=list)  # committed first, then parts in name order
    errors: list[dict] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # fs paths of the parts read (consumed by a commit)
    images: set[str] = field(default_factory=set)  # keys of the PNGs under images/


def _read_parquet(fs, path: str, what: str, retries: int, wait: float) -> list[dict]:
    def read():
        with fs.open(path, "rb") as f:
            return pq.read_table(f).to_pylist()

    try:
        return _retrying(what, read, retries, wait)
    except (pa.ArrowException, EOFError) as err:
        # Parts are written atomically, so this is damage, not a killed writer: stop, keep the file.
        raise LedgerError(
            f"{what} is unreadable ({type(err).__name__}: {err}); nothing was deleted, "
            f"move the file aside to resume without it"
        ) from None


def _listing(fs, folder: str) -> list[str]:
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.find(folder) if TMP_MARK not in posixpath.basename(p))


def read_state(layout: Layout, *, retries: int = 3, wait: float = 0.5) -> LedgerState:
    """Committed tables + every ledger part + the PNG keys present; raises LedgerError naming what it cannot read."""
    fs, root = layout.fs()
    state = LedgerState()
    for uri, target in ((layout.manifest, state.rows), (layout.errors, state.errors)):
        path = fs._strip_protocol(uri)
        if _retrying(uri, lambda p=path: fs.exists(p), retries, wait):
            target += _read_parquet(fs, path, f"table '{uri}'", retries, wait)
    for kind, target in (("rows", state.rows), ("errors", state.errors)):
        for path in _listing(fs, f"{root}/_ledger/{kind}"):
            target += _read_parquet(fs, path, f"ledger part '{path}'", retries, wait)
            state.parts.append(path)
    state.images = {posixpath.relpath(p, root) for p in _listing(fs, f"{root}/images")}
    return state


def commit(layout: Layout, rows: pa.Table, errors: pa.Table, consumed: list[str]) -> None:
    """Switch in the new manifest and errors tables, then remove the ledger parts they now hold."""
    write_table_atomic(rows, layout.manifest, fault="commit.write")
    fault_point("commit.between")
    write_table_atomic(errors, layout.errors, fault="commit.write_errors")
    fault_point("commit.parts")
    fs, _ = layout.fs()
    for path in consumed:
        fs.rm(path)
    remove_empty_ledger(layout)


def remove_empty_ledger(layout: Layout) -> None:
    """Remove `_ledger/<kind>/` folders (and `_ledger/`) that a commit left empty; a folder still holding
    a part (work of a batch that finished after the commit's read) stays. Object stores have no folders."""
    fs, root = layout.fs()
    ledger = f"{root}/_ledger"
    if not fs.isdir(ledger):
        return
    for folder in sorted((p for p in fs.find(ledger, withdirs=True) if fs.isdir(p)), key=len, reverse=True):
        if not fs.ls(folder, detail=False):
            try:
                fs.rmdir(folder)
            except OSError:  # something arrived in between, or a store without folders: leave it
                pass


def check_config_hash(rows: list[dict], results_hash: str, output: str) -> None:
    """Refuse an output folder that holds results of another configuration (one line, both hashes)."""
    other = sorted({r["config_hash"] for r in rows if r.get("config_hash")} - {results_hash})
    if other:
        raise ValueError(
            f"output '{output}' holds results of another configuration or model weights "
            f"(config_hash {other}, this run's is {results_hash}); choose a new output URI"
        )
