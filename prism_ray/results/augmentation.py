"""What an augment output folder holds, read one way: its quota sets, its finished attempts, its augmentation set.

Every committed manifest row of an augment output has a `quota_status`: in_quota (the subgroup's exact quota
set), beyond_quota (finished after the quota was met, kept) or set_aside (a subgroup/selector/intervention
the run's config no longer has). A row without one (a manifest written without quota bookkeeping) is its
own quota set: it counts as in_quota everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

QUOTA_SET = (None, "in_quota")  # the quota sets: scored, counted, trained on
FINISHED = (None, "in_quota", "beyond_quota")  # every finished attempt of this config (not set_aside)


def in_quota_set(row: Mapping) -> bool:
    """Whether a manifest row belongs to its subgroup's quota set."""
    return row.get("quota_status") in QUOTA_SET


def finished_attempt(row: Mapping) -> bool:
    """Whether a manifest row is a finished attempt of the run's own config (in or beyond the quota)."""
    return row.get("quota_status") in FINISHED


def augment_rows(folder: str, limit: int | None = None):
    """The augmentation set of an augment output: its quota sets' `accepted` rows, in the manifest's order;
    with `limit`, at most that many per subgroup: the first by `attempt_rank` (the subgroup's deterministic
    attempt order, the quota's prefix), so a smaller limit takes a prefix of a larger one's."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from prism_ray.data.storage import join_uri, read_table

    table = read_table(join_uri(folder, "manifest.parquet"))
    if "quota_status" in table.column_names:
        status = table.column("quota_status")
        quota = pc.or_kleene(pc.is_null(status), pc.equal(status, "in_quota"))
    else:
        quota = pa.array(np.ones(table.num_rows, bool))
    table = table.filter(pc.and_(quota, table.column("accepted")))
    if limit is None:
        return table
    subgroups = table.column("subgroup").to_pylist()
    ranks = table.column("attempt_rank").to_pylist()
    order = sorted(range(table.num_rows), key=lambda i: (ranks[i] is None, ranks[i] or 0, i))  # stable
    taken: dict = {}
    chosen = np.zeros(table.num_rows, bool)
    for i in order:
        if taken.get(subgroups[i], 0) < limit:
            taken[subgroups[i]] = taken.get(subgroups[i], 0) + 1
            chosen[i] = True
    return table.filter(pa.array(chosen))
