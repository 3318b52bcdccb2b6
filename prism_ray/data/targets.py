"""A classifier's targets from a manifest: one column per head, 1 / 0 / NaN (no label); no torch."""

from __future__ import annotations

import numpy as np


def head_targets(table, heads: dict[str, str], uncertain: str = "negative") -> np.ndarray:
    """(N, H) float32 targets: 1, 0 or NaN (no label) from each head's column, in `heads` order.

    A finding column is 1 / 0 / -1 (uncertain, by `uncertain`) / blank (NaN); 'column=value' is 1 where
    the cell equals value. A missing column is a ValueError naming the head.
    """
    out = np.full((table.num_rows, len(heads)), np.nan, np.float32)
    for h, (head, spec) in enumerate(heads.items()):
        column, _, value = spec.partition("=")
        if column not in table.column_names:
            raise ValueError(f"config field 'heads.{head}': the manifest has no column {column!r}")
        cells = table.column(column).to_pylist()
        if value:
            out[:, h] = [np.nan if c is None else float(str(c) == value) for c in cells]
            continue
        x = np.array([np.nan if c is None else float(c) for c in cells], np.float64)
        x[x == -1.0] = {"negative": 0.0, "positive": 1.0, "ignore": np.nan}[uncertain]
        if np.any(np.isfinite(x) & (x != 0.0) & (x != 1.0)):
            raise ValueError(
                f"config field 'heads.{head}': column {column!r} has values other than 1/0/-1/blank"
            )
        out[:, h] = x
    return out
