"""Manifest rows -> (image URI, caption, attributes) with per-row errors instead of crashes.

`prepare_manifest` runs before anything matches or captions rows: `read_manifest` (a CSV's label
columns as text), `select_rows` (split, limit; each row keeps its input row number in
`ROW_COLUMN`), `decode_uris` (image paths pyarrow read as bytes -> text; a path that is not UTF-8
-> a row error), `normalise_labels` (the adapter's label schema: one type per column whatever CSV
inference did, bad cells -> row errors) and `collapse_duplicates` (exact copies -> one row; one
image with two different rows -> row errors). Row errors name the input row and the image URI,
never other columns' values (they may identify a patient).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prism_ray.data.captions import CaptionAdapter, LabelColumn, get_adapter
from prism_ray.data.config import DataConfig
from prism_ray.data.storage import read_table, resolve_uri

# 0-based row of the input manifest, before split/limit/selection; added by `number_rows`.
ROW_COLUMN = "__row__"

# Column type each label kind is read as ("scalar" columns are kept as read).
_LABEL_TYPES = {"finding": pa.float64(), "flag": pa.bool_(), "count": pa.int64(), "text": pa.string()}


@dataclass(frozen=True)
class SourceRow:
    """One usable manifest row."""

    index: int  # 0-based row of the input manifest (before split/limit/selection)
    image_uri: str
    caption: str
    row: dict[str, Any] = field(hash=False, compare=False)  # labels as normalised, without ROW_COLUMN


@dataclass(frozen=True)
class RowError:
    """One unusable row, ready for the errors table."""

    source_uri: str | None
    stage: str
    reason: str

    def as_row(self) -> dict:
        return {"source_uri": self.source_uri, "stage": self.stage, "reason": self.reason}


@dataclass(frozen=True)
class Manifest:
    """The rows a job works on: selected, labels normalised, duplicates collapsed."""

    table: pa.Table  # has ROW_COLUMN; label columns typed by the adapter's label schema
    errors: list[RowError]  # rows dropped on the way (non-UTF-8 paths, bad label cells, conflicting duplicates)
    duplicate_rows_collapsed: int  # exact copies of a kept row (for the job summary)
    input_rows: int = 0  # rows of the input manifest, before split / limit


def number_rows(table: pa.Table) -> pa.Table:
    """`table` with ROW_COLUMN = its row numbers; a table that already has them keeps them."""
    if ROW_COLUMN in table.column_names:
        return table
    return table.append_column(ROW_COLUMN, pa.array(np.arange(table.num_rows, dtype=np.int64)))


def read_manifest(config: DataConfig, adapter: CaptionAdapter | None = None) -> pa.Table:
    """`config.manifest` as a table, with a CSV's label columns read as text for `normalise_labels`.

    pyarrow infers one type per CSV column from all of its cells: one `True` cell turns the
    column's 1s into True as well, one `yes` turns them into the text "1". Read as text, every
    cell is judged on its own. Parquet is read as stored (its types are the writer's choice).
    """
    uri = config.manifest
    if not uri.lower().endswith((".csv", ".csv.gz")):
        return read_table(uri)
    adapter = adapter if adapter is not None else get_adapter(config.adapter, **config.adapter_options)
    as_text = {column.name: pa.string() for column in adapter.label_schema if column.kind != "scalar"}
    return read_table(uri, column_types=as_text)


def select_rows(table: pa.Table, config: DataConfig) -> pa.Table:
    """`data.split` and `data.limit` applied; ROW_COLUMN keeps each row's input row number."""
    if config.image_column not in table.column_names:
        raise ValueError(f"manifest '{config.manifest}': missing column '{config.image_column}'")
    table = number_rows(table)
    if config.split is not None:
        if "split" not in table.column_names:
            raise ValueError(f"manifest '{config.manifest}': data.split is set but there is no 'split' column")
        mask = pc.equal(table.column("split"), config.split)
        table = table.filter(mask)
    if config.limit is not None:
        table = table.slice(0, config.limit)
    return table


def row_label(index: int | None, image_uri: Any) -> str:
    """How a reason names a row: "row 17 ('images/x.png')", the input row and the image as written.

    Only these two: other columns may identify a patient, so reasons never quote them.
    """
    row = "row ?" if index is None else f"row {index}"
    return f"{row} ({str(image_uri)!r})" if _has_uri(image_uri) else row


def _has_uri(raw: Any) -> bool:
    return raw is not None and bool(str(raw).strip())


def _row_error(table: pa.Table, position: int, config: DataConfig, stage: str, reason: str) -> RowError:
    raw = table.column(config.image_column)[position].as_py() if config.image_column in table.column_names else None
    uri = resolve_uri(str(raw), config.image_root) if _has_uri(raw) else None
    return RowError(uri, stage, f"{row_label(table.column(ROW_COLUMN)[position].as_py(), raw)}: {reason}")


def decode_uris(table: pa.Table, config: DataConfig) -> tuple[pa.Table, list[RowError]]:
    """A bytes image column -> text, each path decoded as the filesystem does (`os.fsdecode`); a path that
    is not UTF-8 is its own row's error.

    pyarrow types a CSV column by all of its cells: one path with a non-UTF-8 byte (a Latin-1 file name)
    makes the whole column bytes. Outputs store URIs as UTF-8 text, so that one name cannot be a source;
    the error has no `source_uri`, so that the row, once renamed, is a new source on the next run.
    """
    column = table.column(config.image_column)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return table, []
    table = number_rows(table)
    uris: list[str | None] = []
    errors: list[RowError] = []
    keep = np.ones(table.num_rows, dtype=bool)
    for position, raw in enumerate(column.to_pylist()):
        name = None if raw is None else os.fsdecode(raw)
        try:
            if raw is not None:
                raw.decode("utf-8")
        except UnicodeDecodeError as err:
            index = table.column(ROW_COLUMN)[position].as_py()
            reason = (f"{row_label(index, name)}: column '{config.image_column}' is not UTF-8 (byte "
                      f"0x{raw[err.start]:02x} at {err.start}); rename the file or write the manifest in UTF-8")
            errors.append(RowError(None, "read", reason))
            keep[position] = False
            name = None
        uris.append(name)
    table = table.set_column(table.column_names.index(config.image_column), config.image_column,
                             pa.array(uris, pa.string()))
    return table.filter(pa.array(keep)), errors


def _normalise_column(values: pa.ChunkedArray, column: LabelColumn) -> tuple[pa.Array | pa.ChunkedArray, dict[int, str]]:
    """One label column -> (the column in its label type, {position: reason} for the bad cells)."""
    target = _LABEL_TYPES[column.kind]
    array = values.combine_chunks()
    numeric = pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_decimal(array.type)
    if numeric and column.kind in ("finding", "flag", "count"):
        # Typed columns (Parquet, clean CSV) are checked without a Python loop.
        number = pc.cast(array, pa.float64())
        if pa.types.is_floating(array.type):
            number = pc.if_else(pc.is_nan(number), pa.scalar(None, pa.float64()), number)  # NaN is blank
        if column.kind == "finding":
            ok = pc.is_in(number, value_set=pa.array([1.0, 0.0, -1.0]))
        elif column.kind == "flag":
            ok = pc.is_in(number, value_set=pa.array([1.0, 0.0]))
        else:
            ok = pc.and_(pc.equal(pc.floor(number), number), pc.greater_equal(number, 0.0))
        ok = pc.fill_null(pc.or_kleene(ok, pc.is_null(number)), True)
        bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
        problems = {int(i): _cell_problem(array[int(i)].as_py(), column) for i in bad}
        if not problems and array.type == target and number.null_count == array.null_count:
            return values, {}  # already the right type and values: pass through as is
        number = pc.if_else(ok, number, pa.scalar(None, pa.float64()))  # bad rows are dropped anyway
        return pc.cast(number, target), problems
    if column.kind == "flag" and pa.types.is_boolean(array.type):
        return values, {}
    # Text cells (a CSV column pyarrow read as strings), bools, or text columns: cell by cell.
    parsed: list[Any] = []
    problems: dict[int, str] = {}
    for position, value in enumerate(array.to_pylist()):
        try:
            parsed.append(column.parse(value))
        except ValueError as err:
            problems[position] = f"column {column.name!r}: {err}"
            parsed.append(None)
    return pa.array(parsed, type=target), problems


def _cell_problem(value: Any, column: LabelColumn) -> str:
    try:
        column.parse(value)
    except ValueError as err:
        return f"column {column.name!r}: {err}"
    raise AssertionError(f"column {column.name!r}: {value!r} failed the vectorised check but parses")


def normalise_labels(
    table: pa.Table, config: DataConfig, adapter: CaptionAdapter | None = None
) -> tuple[pa.Table, list[RowError]]:
    """Read every label column through the adapter's label schema; rows with a bad cell become errors.

    A CheXpert column comes out float64 (1, 0, -1, null for blank) whatever CSV inference made
    of it, so one `yes` cell drops its own row and never changes how the other rows match a
    selector. A missing label column is a ValueError naming it (unless the manifest has a
    `caption` column, which then replaces the labels).
    """
    adapter = adapter if adapter is not None else get_adapter(config.adapter, **config.adapter_options)
    has_caption = "caption" in table.column_names
    missing = [c for c in adapter.label_columns if c not in table.column_names]
    if missing and not has_caption:  # a manifest-level mistake: say it once, not once per row
        raise ValueError(f"manifest '{config.manifest}': missing label column(s) {missing} for adapter '{config.adapter}'")
    table = number_rows(table)
    problems: dict[int, list[str]] = {}
    for column in adapter.label_schema:
        if column.kind == "scalar" or column.name not in table.column_names:
            continue
        values, bad = _normalise_column(table.column(column.name), column)
        table = table.set_column(table.column_names.index(column.name), column.name, values)
        for position, reason in bad.items():
            problems.setdefault(position, []).append(reason)
    if not problems:
        return table, []
    errors = [_row_error(table, p, config, "read", "; ".join(problems[p])) for p in sorted(problems)]
    keep = np.ones(table.num_rows, dtype=bool)
    keep[sorted(problems)] = False
    return table.filter(pa.array(keep)), errors


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _rows_text(rows: list[int]) -> str:
    return f"rows {', '.join(map(str, rows[:-1]))} and {rows[-1]}"


def collapse_duplicates(
    table: pa.Table, config: DataConfig, adapter: CaptionAdapter | None = None
) -> tuple[pa.Table, list[RowError], int]:
    """Rows for the same image: exact copies collapse to the first; rows that differ are all errors.

    Returns (table, errors, duplicate_rows_collapsed). Images are compared by resolved URI; the
    same bytes under two paths are two sources. Reasons name the differing columns, not values.
    """
    adapter = adapter if adapter is not None else get_adapter(config.adapter, **config.adapter_options)
    table = number_rows(table)
    by_uri: dict[str, list[int]] = {}
    for position, raw in enumerate(table.column(config.image_column).to_pylist()):
        if _has_uri(raw):  # empty URIs are reported when rows are read
            by_uri.setdefault(resolve_uri(str(raw), config.image_root), []).append(position)
    groups = [positions for positions in by_uri.values() if len(positions) > 1]
    if not groups:
        return table, [], 0
    compared = [c for c in table.column_names if c not in (ROW_COLUMN, config.image_column)]
    labels = set(adapter.label_columns)
    drop: list[int] = []
    errors: list[RowError] = []
    collapsed = 0
    for positions in groups:
        rows = table.select(compared).take(positions).to_pylist()
        differing = [c for c in compared if not all(_same(rows[0][c], r[c]) for r in rows[1:])]
        if not differing:
            drop.extend(positions[1:])
            collapsed += len(positions) - 1
            continue
        # Which row is right is not ours to guess: every row of the image becomes an error.
        drop.extend(positions)
        numbers = [table.column(ROW_COLUMN)[p].as_py() for p in positions]
        raw = table.column(config.image_column)[positions[0]].as_py()
        if any(c in labels for c in differing):
            what = f"different labels ({', '.join(c for c in differing if c in labels)})"
        else:
            what = f"different values in column(s) {', '.join(map(repr, differing))}"
        reason = f"{_rows_text(numbers)} give {str(raw)!r} {what}"
        uri = resolve_uri(str(raw), config.image_root)
        errors.extend(RowError(uri, "read", reason) for _ in positions)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[drop] = False
    return table.filter(pa.array(keep)), errors, collapsed


def prepare_manifest(config: DataConfig, table: pa.Table | None = None) -> Manifest:
    """The job's rows (read from `config.manifest` unless `table` is given), ready to select and caption.

    Job-level mistakes (missing image or label column, no split column) raise ValueError;
    row-level ones become `Manifest.errors`. Idempotent: a prepared table passes through unchanged.
    """
    adapter = get_adapter(config.adapter, **config.adapter_options)
    raw = table if table is not None else read_manifest(config, adapter)
    table = select_rows(raw, config)
    table, uri_errors = decode_uris(table, config)
    table, label_errors = normalise_labels(table, config, adapter)
    table, duplicate_errors, collapsed = collapse_duplicates(table, config, adapter)
    return Manifest(table, uri_errors + label_errors + duplicate_errors, collapsed, input_rows=raw.num_rows)


def read_sources(config: DataConfig, table: pa.Table | None = None) -> tuple[list[SourceRow], list[RowError]]:
    """Read the manifest and caption every row; rows the caption policy rejects become errors.

    `table` defaults to `config.manifest`; it runs through `prepare_manifest` (a no-op for an
    already prepared table, so a caller can select rows on the prepared table first). A
    `caption` column, when present, is used as given (free-text datasets; empty is an error);
    otherwise the configured dataset adapter builds the caption from the label columns.
    """
    manifest = prepare_manifest(config, table)
    table = manifest.table
    adapter = get_adapter(config.adapter, **config.adapter_options)
    has_caption = "caption" in table.column_names
    sources: list[SourceRow] = []
    errors = list(manifest.errors)
    for row in table.to_pylist():
        index = row.pop(ROW_COLUMN)
        raw = row.get(config.image_column)
        label = row_label(index, raw)
        if not _has_uri(raw):
            errors.append(RowError(None, "read", f"{label}: empty '{config.image_column}'"))
            continue
        uri = resolve_uri(str(raw), config.image_root)
        if has_caption:
            caption = str(row.get("caption") or "").strip()
            if not caption:
                errors.append(RowError(uri, "caption", f"{label}: empty caption"))
                continue
        else:
            try:
                caption = adapter.caption(row)
            except ValueError as err:  # RowRejected (a policy dropped the row) or a bad label value
                errors.append(RowError(uri, "caption", f"{label}: {err}"))
                continue
        sources.append(SourceRow(index, uri, caption, row))
    return sources, errors
