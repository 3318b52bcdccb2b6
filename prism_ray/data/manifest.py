"""Manifest rows -> (image URI, caption, attributes) with per-row errors instead of crashes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from prism_ray.data.captions import RowRejected, get_adapter
from prism_ray.data.config import DataConfig
from prism_ray.data.storage import read_table, resolve_uri


@dataclass(frozen=True)
class SourceRow:
    """One usable manifest row."""

    index: int  # row number in the manifest (stable across runs)
    image_uri: str
    caption: str
    row: dict[str, Any] = field(hash=False, compare=False)


@dataclass(frozen=True)
class RowError:
    """One unusable row, ready for the errors table."""

    source_uri: str | None
    stage: str
    reason: str

    def as_row(self) -> dict:
        return {"source_uri": self.source_uri, "stage": self.stage, "reason": self.reason}


def select_rows(table: pa.Table, config: DataConfig) -> pa.Table:
    if config.image_column not in table.column_names:
        raise ValueError(f"manifest '{config.manifest}': missing column '{config.image_column}'")
    if config.split is not None:
        if "split" not in table.column_names:
            raise ValueError(f"manifest '{config.manifest}': data.split is set but there is no 'split' column")
        mask = pc.equal(table.column("split"), config.split)
        table = table.filter(mask)
    if config.limit is not None:
        table = table.slice(0, config.limit)
    return table


def read_sources(config: DataConfig, table: pa.Table | None = None) -> tuple[list[SourceRow], list[RowError]]:
    """Read the manifest and caption every row; rows the caption policy rejects become errors.

    A `caption` column, when present, is used as given (free-text datasets; empty is an error);
    otherwise the configured dataset adapter builds the caption from the label columns.
    """

    table = select_rows(table if table is not None else read_table(config.manifest), config)
    adapter = get_adapter(config.adapter, **config.adapter_options)
    has_caption = "caption" in table.column_names
    missing = [c for c in adapter.label_columns if c not in table.column_names]
    if missing and not has_caption:  # a manifest-level mistake: say it once, not once per row
        raise ValueError(f"manifest '{config.manifest}': missing label column(s) {missing} for adapter '{config.adapter}'")
    sources: list[SourceRow] = []
    errors: list[RowError] = []
    for index, row in enumerate(table.to_pylist()):
        raw_uri = row.get(config.image_column)
        if not raw_uri:
            errors.append(RowError(None, "read", f"row {index}: empty '{config.image_column}'"))
            continue
        uri = resolve_uri(str(raw_uri), config.image_root)
        if has_caption:
            caption = str(row.get("caption") or "").strip()
            if not caption:
                errors.append(RowError(uri, "caption", f"row {index}: empty caption"))
                continue
        else:
            try:
                caption = adapter.caption(row)
            except ValueError as err:  # RowRejected (a policy dropped the row) or a bad label value
                reason = str(err) if isinstance(err, RowRejected) else f"row {index}: {err}"
                errors.append(RowError(uri, "caption", reason))
                continue
        sources.append(SourceRow(index, uri, caption, row))
    return sources, errors
