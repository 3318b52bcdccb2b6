"""Per-item failures: one bad image is reported and dropped, the rest of its batch carries on."""

from __future__ import annotations


class ItemError(ValueError):
    """Item `index` of a batch failed at `stage` (a value of the errors table's `stage` column)."""

    def __init__(self, index: int, stage: str, reason: str):
        super().__init__(f"item {index}: {stage}: {reason}")
        self.index = index
        self.stage = stage
        self.reason = reason

    def as_tuple(self) -> tuple[int, str, str]:
        return (self.index, self.stage, self.reason)
