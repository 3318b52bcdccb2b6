"""Where a job's outputs live under its output URI, and the one id digest every job uses."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


def digest(*parts: object, size: int = 24) -> str:
    """Deterministic hex id of `parts` (joined with a separator no part contains)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:size]


@dataclass(frozen=True)
class Layout:
    """Paths under one output folder (any fsspec URI); a `key` is relative to it ('images/g/x.png').

    <root>/manifest.parquet        committed rows (one per finished attempt)
    <root>/errors.parquet          committed error rows (source, stage, reason)
    <root>/run_summary.json        the last run's summary
    <root>/images/<group>/<id>.png outputs, written before their ledger rows
    <root>/_ledger/<kind>/*.parquet work done since the last commit (one part per batch)
    """

    root: str  # as configured (URI or absolute local path), without a trailing slash

    @classmethod
    def of(cls, output: str) -> Layout:
        root = output.rstrip("/")
        if "://" not in root:
            root = os.path.abspath(os.path.expanduser(root))
        return cls(root)

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    @staticmethod
    def image_key(group: str, item_id: str) -> str:
        return f"images/{group}/{item_id}.png"

    @property
    def manifest(self) -> str:
        return self.uri("manifest.parquet")

    @property
    def errors(self) -> str:
        return self.uri("errors.parquet")

    @property
    def summary(self) -> str:
        return self.uri("run_summary.json")

    def ledger(self, kind: str, name: str = "") -> str:
        return self.uri(f"_ledger/{kind}/{name}" if name else f"_ledger/{kind}")

    def fs(self):
        """(fsspec filesystem, root path in it)."""
        import fsspec

        return fsspec.core.url_to_fs(self.root)
