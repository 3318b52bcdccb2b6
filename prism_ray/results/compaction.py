"""Streamed compaction of ledger parts into one table, and column-only reads of them (jobs of any size).

`compact_table` writes the committed table plus every ledger part of a kind into a new file record
batch by record batch, switches it in, and only then removes the parts: memory does not grow
with the table, and a crash at any point loses nothing (the next run compacts again).
"""

from __future__ import annotations

from prism_ray.results.layout import Layout
from prism_ray.results.ledger import TMP_MARK, LedgerError, remove_empty_ledger, write_atomic


def ledger_paths(layout: Layout, kind: str) -> list[str]:
    fs, root = layout.fs()
    folder = f"{root}/_ledger/{kind}"
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.find(folder) if TMP_MARK not in p.rsplit("/", 1)[-1])


def table_files(layout: Layout, name: str, kind: str) -> list[str]:
    fs, root = layout.fs()
    committed = [f"{root}/{name}"] if fs.exists(f"{root}/{name}") else []
    return committed + ledger_paths(layout, kind)


def read_column(fs, path: str, column: str) -> list:
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if column not in pf.schema_arrow.names:
                return []
            return pf.read(columns=[column]).column(0).to_pylist()
    except Exception as err:  # noqa: BLE001 - any reader failure is damage: stop, delete nothing
        raise LedgerError(
            f"'{path}' is unreadable ({type(err).__name__}: {err}); nothing was deleted, "
            "move the file aside to resume without it"
        ) from None


def compact_table(layout: Layout, name: str, kind: str, schema) -> int:
    """Stream the committed table + the ledger parts into a new `name`, switch it in, then drop the parts.

    Record batch by record batch (bounded memory at any size); rows of a task already present are
    not written twice (a retried batch after a lost acknowledgement). Returns the row count.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = layout.fs()
    files = table_files(layout, name, kind)
    parts = [p for p in files if "/_ledger/" in p]
    target = f"{root}/{name}"
    if not parts and fs.exists(target):
        return pq.ParquetFile(fs.open(target, "rb")).metadata.num_rows
    # A crash between the switch and the removal of the parts leaves rows both committed and in a
    # part: the part's copy wins. Memory grows with uncompacted tasks only, not with the table.
    in_parts: set[str] = set()
    for path in parts:
        in_parts.update(read_column(fs, path, "task_id"))
    rows = 0

    def stream(out) -> None:
        nonlocal rows
        with pq.ParquetWriter(out, schema) as writer:
            for path in files:
                committed = "/_ledger/" not in path
                with fs.open(path, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
                        table = pa.Table.from_batches([batch])
                        if committed and in_parts and "task_id" in table.column_names:
                            ids = table.column("task_id").to_pylist()
                            keep = [i for i, t in enumerate(ids) if t not in in_parts]
                            table = table.take(pa.array(keep, type=pa.int64()))
                        if table.num_rows:
                            writer.write_table(_conform(table, schema))
                            rows += table.num_rows

    write_atomic(layout.uri(name), stream, "compact.switch")
    for path in parts:
        fs.rm(path)
    remove_empty_ledger(layout)
    return rows


def _conform(table, schema):
    """Cast to `schema`, adding missing columns as nulls (errors tables of older parts, say)."""
    import pyarrow as pa

    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
