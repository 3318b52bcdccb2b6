"""Where a job's outputs live under its output URI, and the one id digest every job uses."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


def digest(*parts: object, size: int = 24) -> str:
    """Deterministic hex id of `parts` (joined with a separator no part contains)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:size]


# Set by Ray's job supervisor in the environment of a driver started by `ray job submit`.
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def is_local_path(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def resolve_output(uri: str, field: str = "output") -> str:
    """Where a job writes, decided on the driver before anything runs.

    A URI (s3://, gs://, ...) or an absolute path is used as it is. A relative path is resolved
    against the current directory when the job runs locally; under `ray job submit` it would land
    in the job's temporary copy of the working dir on one node, so it is refused.
    """
    from prism_ray.config import ConfigError

    root = uri.rstrip("/") or uri
    if not is_local_path(root):
        return root
    path = os.path.expanduser(root.removeprefix("file://"))
    if not os.path.isabs(path):
        if os.environ.get(SUBMITTED_JOB_ENV):
            raise ConfigError(
                f"config field '{field}': relative path {uri!r} under `ray job submit` would be written into "
                "the job's temporary working dir; give a storage URI (s3://...) or an absolute shared path"
            )
        path = os.path.abspath(path)
    return path


@dataclass(frozen=True)
class Layout:
    """Paths under one output folder (any fsspec URI); a `key` is relative to it ('images/g/x.png').

    <root>/manifest.parquet        committed rows (one per finished attempt)
    <root>/errors.parquet          committed error rows (source, stage, reason)
    <root>/summary.json            the last run's summary (every job; augment also writes it as
                                   run_summary.json, its old name, for one release)
    <root>/images/<group>/<id>.png outputs, written before their ledger rows
    <root>/_ledger/<kind>/*.parquet work done since the last commit (one part per batch)
    """

    root: str  # as configured (URI or absolute local path), without a trailing slash

    @classmethod
    def of(cls, output: str, field: str = "output") -> Layout:
        return cls(resolve_output(output, field))

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
        return self.uri("summary.json")

    @property
    def legacy_summary(self) -> str:
        """augment's summary name before this release (still written, to be dropped in the next one)."""
        return self.uri("run_summary.json")

    def ledger(self, kind: str, name: str = "") -> str:
        return self.uri(f"_ledger/{kind}/{name}" if name else f"_ledger/{kind}")

    def fs(self):
        """(fsspec filesystem, root path in it)."""
        import fsspec

        return fsspec.core.url_to_fs(self.root)
