"""The one clock of the results protocol: every `created_at` and run start is this UTC timestamp."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> datetime:
    """Now, timezone-aware in UTC (the schemas store it as `timestamp("ms", tz="UTC")`; JSON as `.isoformat()`)."""
    return datetime.now(timezone.utc)
