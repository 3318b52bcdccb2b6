"""Co-change statistics of the bias audit, streamed from rows.parquet with bounded memory.

Column contract of the rows (one row per source image x intervention; `audit` writes them):

    source_id            str    the image; every row of one image shares it (the bootstrap resamples images)
    intervention         str    e.g. "Cardiomegaly=0"; rows with intervention == CONTROL are ignored
    target               str    the classifier attribute the intervention means to change (constant
                                per intervention); always `expected`
    p_orig__<a>          float  attribute a's probability on the original image        (P_ORIG + a)
    p_cf__<a>            float  ... on the counterfactual                               (P_CF + a)
    p_ctrl__<a>          float  ... on the control: the unedited reconstruction of the same source
                                through the same inversion and sampling                (P_CTRL + a)
    group__<g>           str    optional, subgroup value of the image (sex, age bin, ...); null = unknown
    accepted             bool   optional, the accept filter's decision (S_CLIP ...)
    l1, control_l1, lpips float optional, image distances of the counterfactual / the control

Every row carries its source's control probabilities, so no row has to be joined with another:
the statistics need one pass over the rows in any order. A row with a missing (NaN or null)
probability is left out of the co-change statistics (it still counts in `n_rows`).

Per intervention x attribute x subgroup ("all", and "g=value" for each value of each subgroup
column, "g=v & h=w" for a combination) the images are *paired*: the same image has an edit outcome
e = [decision(p_cf) != decision(p_orig)] and a control outcome c = [decision(p_ctrl) != decision(p_orig)],
with decision(p) = p >= threshold. Reported: the change rates mean(e) and mean(c), their difference,
a bootstrap CI of the difference over images, McNemar's exact p-value, Benjamini-Hochberg q-values
over the whole table, and whether the co-change is expected or flagged (docs/method.md §14).

Memory does not grow with the rows: per (intervention, subgroup) cell the pass keeps counts and
sums, and B bootstrap sums of a Poisson bootstrap (`poisson_weights`), O(cells x attributes x B).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from prism_ray.config import BaseConfig
from prism_ray.scoring.classification import flipped

# --- the column contract --------------------------------------------------------------------

SOURCE_ID, INTERVENTION, TARGET = "source_id", "intervention", "target"
ACCEPTED, L1, CONTROL_L1, LPIPS = "accepted", "l1", "control_l1", "lpips"
P_ORIG, P_CF, P_CTRL = "p_orig__", "p_cf__", "p_ctrl__"  # + attribute name
GROUP = "group__"  # + subgroup name
CONTROL = "control"  # intervention name of control-only rows, if a table has them: skipped
ALL = "all"  # the subgroup of every image

COCHANGE_COLUMNS = (
    "intervention", "attribute", "subgroup", "n", "change_rate", "control_rate", "difference",
    "ci_low", "ci_high", "p_value", "q_value", "expected", "flagged",
)  # fmt: skip
# After COCHANGE_COLUMNS: mean |p_cf - p_orig| and |p_ctrl - p_orig|, the 2 x 2 counts behind the test, and
# the smallest q-value the cell's n allows (`min_q_values`: below alpha, or the cell cannot be flagged at all).
COCHANGE_EXTRA_COLUMNS = (
    "mean_delta_p", "control_mean_delta_p", "n_changed", "n_control_changed", "n_edit_only", "n_control_only",
    "min_q_value",
)  # fmt: skip
INTERVENTION_COLUMNS = (
    "intervention", "subgroup", "target", "n_rows", "n", "target_cpg", "control_target_cpg",
    "acceptance_rate", "mean_l1", "mean_control_l1", "mean_lpips",
)  # fmt: skip


class AuditStatsConfig(BaseConfig):
    """How co-changes are tested and flagged (docs/method.md §14)."""

    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="a head's decision: probability >= threshold")
    alpha: float = Field(0.01, gt=0.0, lt=1.0, description="flag when the BH q-value is below this")
    min_effect: float = Field(
        0.05, ge=0.0, le=1.0, description="... and |change rate - control rate| >= this"
    )
    bootstrap: int = Field(1000, ge=100, description="Poisson bootstrap replicates of the CI")
    ci_level: float = Field(0.95, gt=0.5, lt=1.0, description="coverage of the bootstrap interval")
    seed: int = Field(0, ge=0, lt=2**63, description="seeds the bootstrap weights")
    accepted_only: bool = Field(False, description="co-change statistics over accepted edits only")


class AuditTables(NamedTuple):
    """`cochange`: intervention x attribute x subgroup (COCHANGE_COLUMNS + COCHANGE_EXTRA_COLUMNS).
    `interventions`: intervention x subgroup (INTERVENTION_COLUMNS): target CPG, acceptance, L1."""

    cochange: pa.Table
    interventions: pa.Table


# --- tests and the bootstrap ----------------------------------------------------------------


def mcnemar_exact(edit_only: int, control_only: int) -> float:
    """Two-sided exact McNemar p-value: 2 P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1.

    Why McNemar: each image gives a *paired* binary outcome (changed under the edit, changed under
    the control), and only the discordant images carry information about the difference; under
    "the edit changes the attribute no more often than the reconstruction alone", an image that
    changed under exactly one of the two is equally likely to be either kind. `edit_only` = b,
    `control_only` = c. No discordant pair: p = 1.
    """
    b, c = int(edit_only), int(control_only)
    m, k = b + c, min(b, c)
    if m == 0:
        return 1.0
    j = np.arange(1, k + 1, dtype=np.float64)
    # log C(m, j) for j = 0..k by the ratio C(m, j) / C(m, j - 1) = (m - j + 1) / j.
    log_choose = np.concatenate([[0.0], np.cumsum(np.log((m - j + 1) / j))])
    log_pmf = log_choose - m * math.log(2.0)
    top = log_pmf.max()
    tail = math.exp(top) * float(np.sum(np.exp(log_pmf - top)))
    return min(1.0, 2.0 * tail)


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """BH q-values (step-up, monotone, capped at 1); NaN p-values stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok], kind="stable")
    scaled = p[ok][order] * m / np.arange(1, m + 1)
    scaled = np.minimum.accumulate(scaled[::-1])[::-1]  # q_(i) = min over j >= i of p_(j) m / j
    out = np.empty(m)
    out[order] = np.minimum(scaled, 1.0)
    q[ok] = out
    return q


def min_q_values(n: Sequence[int] | np.ndarray, p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per row of a table, the smallest BH q-value it could get from its number of images n.

    The row's best case under the paired test is every one of its n images changed under the edit and
    none under the control: McNemar's p = 2^(1 - n) (`mcnemar_exact(n, 0)`). That p replaces the row's
    own among the table's observed p-values, and the Benjamini-Hochberg q-value is taken as
    `benjamini_hochberg` takes it. A row whose minimum is at or above alpha cannot be flagged at any
    effect size: its "not flagged" says nothing. NaN where p is NaN (no image).
    """
    n = np.asarray(n, dtype=np.int64)
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = np.argsort(p[ok], kind="stable")
    s = p[ok][order]  # (m,) sorted p-values
    position = np.empty(m, np.int64)
    position[order] = np.arange(m)  # each row's 0-based rank
    rank = np.arange(1, m + 1)
    # q_(k) before the monotone step, and its minimum over ranks >= k (+inf past the end).
    suffix = np.append(np.minimum.accumulate((s * m / rank)[::-1])[::-1], np.inf)
    sizes, which = np.unique(n[ok], return_inverse=True)
    best = np.minimum(np.array([mcnemar_exact(int(k), 0) for k in sizes])[which.reshape(-1)], p[ok])  # (m,)
    start = np.searchsorted(s, best, side="left")  # its new rank (0-based) among the others
    own = best * m / (start + 1)
    # Rows ranked between its new and its old place move down one rank: p m / (k + 2) at old rank k.
    shifted = np.append(s * m / (rank + 1), np.inf)
    bounds = np.stack([start, position], axis=1).reshape(-1)
    between = np.minimum.reduceat(shifted, bounds)[::2]
    between[start >= position] = np.inf
    out[ok] = np.minimum.reduce([own, between, suffix[position + 1], np.ones(m)])
    return out


def images_needed(p_values: Sequence[float] | np.ndarray, alpha: float, max_n: int = 100_000) -> int | None:
    """The fewest images a new cell of this table needs, all changed under the edit and none under the
    control, for a BH q-value below `alpha` (it takes the place of the table's largest p-value);
    None beyond `max_n`. A co-change seen in a share f of the images needs about this / f of them."""
    p = np.asarray(p_values, dtype=np.float64)
    p = p[~np.isnan(p)]
    if len(p) == 0:
        return None
    p = np.concatenate([[p.max()], np.delete(p, p.argmax())])  # the new cell first, in the largest p's place
    others = np.zeros(len(p) - 1, np.int64)

    def best_q(n: int) -> float:
        return float(min_q_values(np.concatenate([[n], others]), p)[0])

    if best_q(max_n) >= alpha:
        return None
    lo, hi = 1, max_n
    while lo < hi:  # the minimum q falls with n: bisect for the first n below alpha
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if best_q(mid) >= alpha else (lo, mid)
    return lo


def _poisson1_table(bits: int = 16) -> np.ndarray:
    """Inverse CDF of Poisson(1) on the 2**bits midpoint quantiles: uniform integer -> count."""
    cdf = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(20)])
    quantiles = (np.arange(2**bits) + 0.5) / 2**bits
    return np.searchsorted(cdf, quantiles, side="right").astype(np.float32)


_POISSON1 = _poisson1_table()
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014) on a uint64 array, in place; wraps mod 2**64."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def source_keys(source_ids: Iterable[str], seed: int) -> np.ndarray:
    """A seeded 64-bit key per source id (BLAKE2b), the same in every process and batch."""
    salt = int(seed).to_bytes(8, "little")
    keys = [hashlib.blake2b(s.encode(), digest_size=8, key=salt).digest() for s in source_ids]
    return np.frombuffer(b"".join(keys), dtype="<u8").astype(np.uint64)


def poisson_weights(source_ids: Iterable[str], replicates: int, seed: int) -> np.ndarray:
    """(N, replicates) float32 Poisson(1) bootstrap weights, a pure function of (source id, seed).

    The Poisson bootstrap (Hanley & MacGibbon 2006; Chamandy et al. 2012, "Estimating uncertainty
    for massive data streams") replaces resampling n images with replacement by an independent
    Poisson(1) count per image and replicate, so each replicate can be summed in one pass in any
    order. Here the counts come from a counter-based generator: SplitMix64 over (key of the
    source, replicate counter), 16 bits per draw mapped through Poisson(1)'s inverse CDF. An image
    therefore weighs the same in every row (intervention) and batch it appears in.
    """
    keys = source_keys(source_ids, seed)
    words = -(-replicates // 4)  # four 16-bit draws per 64-bit word
    counters = _GOLDEN * np.arange(1, words + 1, dtype=np.uint64)
    x = keys[:, None] + counters[None, :]  # (N, words)
    draws = _splitmix64(x).astype("<u8", copy=False).view("<u2")[:, :replicates]  # (N, B)
    return _POISSON1[draws]


# --- the streaming pass ---------------------------------------------------------------------


class _Chunk(NamedTuple):
    """The decoded rows of one slice of a batch; (n, A) arrays are over the accumulator's attributes."""

    valid: np.ndarray  # (n,) counted in the co-change statistics
    edit: np.ndarray  # (n, A) bool, decision changed under the edit
    control: np.ndarray  # (n, A) bool, ... under the control
    delta_p: np.ndarray  # (n, A) |p_cf - p_orig|
    control_delta_p: np.ndarray  # (n, A) |p_ctrl - p_orig|
    target_gain: np.ndarray  # (n,) |p_cf - p_orig| of the row's target attribute (NaN: no such head)
    control_target_gain: np.ndarray  # (n,) |p_ctrl - p_orig| of it
    weights: np.ndarray  # (n, B) float32 Poisson weights, zero on rows that are not valid
    scores: dict[str, np.ndarray]  # optional per-row scores: accepted (as 0/1), l1, control_l1, lpips


@dataclass
class _Cell:
    """Sufficient statistics of one (intervention, subgroup): per attribute counts and sums, and
    per bootstrap replicate the weighted image count and weighted (edit - control) change count."""

    attributes: int
    replicates: int
    n_rows: int = 0
    n: int = 0
    changed: np.ndarray = field(init=False)  # (A,) edit changed the decision
    control_changed: np.ndarray = field(init=False)  # (A,) control changed it
    edit_only: np.ndarray = field(init=False)  # (A,) edit yes, control no
    control_only: np.ndarray = field(init=False)  # (A,) control yes, edit no
    delta_p: np.ndarray = field(init=False)  # (A,) sum |p_cf - p_orig|
    control_delta_p: np.ndarray = field(init=False)  # (A,) sum |p_ctrl - p_orig|
    boot_n: np.ndarray = field(init=False)  # (B,) sum of weights
    boot_diff: np.ndarray = field(init=False)  # (A, B) sum of weight * (e - c)
    sums: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum, count] of a per-row score

    def __post_init__(self) -> None:
        a, b = self.attributes, self.replicates
        for name in ("changed", "control_changed", "edit_only", "control_only"):
            setattr(self, name, np.zeros(a, np.int64))
        self.delta_p, self.control_delta_p = np.zeros(a), np.zeros(a)
        self.boot_n, self.boot_diff = np.zeros(b), np.zeros((a, b))

    @classmethod
    def of_rows(cls, chunk: _Chunk, rows: np.ndarray, weights: np.ndarray) -> _Cell:
        """The statistics of `rows` of a chunk; `weights`: their (r, B) bootstrap weights."""
        cell = cls(chunk.edit.shape[1], weights.shape[1])
        valid = chunk.valid[rows]
        edit, control = chunk.edit[rows], chunk.control[rows]  # (r, A), False on invalid rows
        cell.n_rows, cell.n = len(rows), int(valid.sum())
        cell.changed, cell.control_changed = edit.sum(0), control.sum(0)
        cell.edit_only, cell.control_only = (edit & ~control).sum(0), (control & ~edit).sum(0)
        cell.delta_p = chunk.delta_p[rows][valid].sum(0)
        cell.control_delta_p = chunk.control_delta_p[rows][valid].sum(0)
        # Integer-valued float32 sums stay exact (< 2**24 per slice), so the totals do not depend on
        # how the rows were batched or ordered.
        cell.boot_n = weights.sum(0, dtype=np.float32).astype(np.float64)
        difference = (edit.astype(np.float32) - control.astype(np.float32)).T  # (A, r)
        cell.boot_diff = (difference @ weights).astype(np.float64)  # (A, B)
        cell.add_mean("target_cpg", chunk.target_gain[rows])
        cell.add_mean("control_target_cpg", chunk.control_target_gain[rows])
        for name, values in chunk.scores.items():
            cell.add_mean(name, values[rows])
        return cell

    def merge(self, other: _Cell) -> None:
        """Add another cell's statistics (disjoint rows) into this one."""
        self.n_rows += other.n_rows
        self.n += other.n
        for name in ("changed", "control_changed", "edit_only", "control_only", "delta_p", "control_delta_p",
                     "boot_n", "boot_diff"):  # fmt: skip
            mine = getattr(self, name)
            mine += getattr(other, name)
        for name, (total, count) in other.sums.items():
            sums = self.sums.setdefault(name, [0.0, 0])
            sums[0] += total
            sums[1] += count

    def add_mean(self, name: str, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        total = self.sums.setdefault(name, [0.0, 0])
        total[0] += float(finite.sum())
        total[1] += int(finite.size)

    def mean(self, name: str) -> float:
        total, count = self.sums.get(name, (0.0, 0))
        return total / count if count else math.nan


class CoChangeAccumulator:
    """One pass over audit rows in record batches, any order and batch size; `result()` at the end.

    `attributes`: the classifier attributes to test (each needs its three probability columns).
    `subgroups`: subgroup names (column GROUP + name) and tuples of names (label combinations).
    `expected`: intervention -> attributes it may change without being flagged (besides its target,
    which is always expected; e.g. the pacemaker head for do(Support Devices=0)).
    """

    # Rows per slice: bounds the (rows, B) weight matrix to ~8 MB at any B.
    slice_cells = 1 << 21

    def __init__(
        self,
        attributes: Sequence[str],
        subgroups: Sequence[str | Sequence[str]] = (),
        expected: Mapping[str, Iterable[str]] | None = None,
        config: AuditStatsConfig | None = None,
    ):
        self.attributes = list(attributes)
        if not self.attributes:
            raise ValueError("attributes: no classifier attribute to test")
        self.subgroups = [(s,) if isinstance(s, str) else tuple(s) for s in subgroups]
        if any(not s for s in self.subgroups):
            raise ValueError("subgroups: an empty combination")
        self.expected = {k: set(v) for k, v in (expected or {}).items()}
        self.config = config or AuditStatsConfig()
        self._column = {a: i for i, a in enumerate(self.attributes)}
        self._cells: dict[tuple[str, int, str], _Cell] = {}  # (intervention, subgroup spec, name) -> cell
        self._targets: dict[str, str] = {}

    def required_columns(self) -> list[str]:
        probabilities = [p + a for a in self.attributes for p in (P_ORIG, P_CF, P_CTRL)]
        groups = list(dict.fromkeys(GROUP + g for spec in self.subgroups for g in spec))
        return [SOURCE_ID, INTERVENTION, TARGET, *probabilities, *groups]

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        missing = [c for c in self.required_columns() if c not in batch.schema.names]
        if missing:
            raise ValueError(f"audit rows: missing column(s) {missing}")
        if self.config.accepted_only and ACCEPTED not in batch.schema.names:
            raise ValueError(f"accepted_only: the rows have no '{ACCEPTED}' column")
        batch = batch.filter(pc.invert(pc.fill_null(pc.equal(batch[INTERVENTION], CONTROL), False)))
        step = max(1, self.slice_cells // self.config.bootstrap)
        for start in range(0, batch.num_rows, step):
            part = batch.slice(start, step)
            self._add(part, self._decode(part))

    # -- one slice ------------------------------------------------------------------------

    def _targets_of(self, batch: pa.RecordBatch | pa.Table) -> np.ndarray:
        """(n,) the column index of each row's target attribute, -1 when no classifier has it."""
        pairs = pa.table({"i": batch[INTERVENTION], "t": batch[TARGET]}).group_by(["i", "t"]).aggregate([])
        for intervention, target in zip(pairs["i"].to_pylist(), pairs["t"].to_pylist(), strict=True):
            if intervention is None or target is None:
                raise ValueError(
                    f"audit rows: null '{INTERVENTION}' or '{TARGET}' ({intervention!r}, {target!r})"
                )
            known = self._targets.setdefault(intervention, target)
            if known != target:
                raise ValueError(
                    f"audit rows: intervention {intervention!r} has targets {known!r} and {target!r}"
                )
        targets = _encoded(batch[TARGET])
        lookup = np.array([self._column.get(t, -1) for t in targets.dictionary.to_pylist()], dtype=np.int64)
        return lookup[targets.indices.to_numpy()]

    def _decode(self, batch: pa.RecordBatch | pa.Table) -> _Chunk:
        def probs(prefix: str) -> np.ndarray:  # (n, A) float64, NaN where null
            cols = [
                batch[prefix + a].cast(pa.float64()).to_numpy(zero_copy_only=False) for a in self.attributes
            ]
            return np.stack(cols, axis=1)

        def score(name: str) -> np.ndarray | None:
            if name not in batch.schema.names:
                return None
            return batch[name].cast(pa.float64()).to_numpy(zero_copy_only=False)

        p_orig, p_cf, p_ctrl = probs(P_ORIG), probs(P_CF), probs(P_CTRL)
        scores = {name: v for name in (ACCEPTED, L1, CONTROL_L1, LPIPS) if (v := score(name)) is not None}
        valid = np.isfinite(p_orig).all(1) & np.isfinite(p_cf).all(1) & np.isfinite(p_ctrl).all(1)
        if self.config.accepted_only:
            valid &= scores[ACCEPTED] == 1.0
        t = self.config.threshold
        edit = flipped(p_orig, p_cf, t) & valid[:, None]
        control = flipped(p_orig, p_ctrl, t) & valid[:, None]
        delta_p, control_delta_p = np.abs(p_cf - p_orig), np.abs(p_ctrl - p_orig)

        target = self._targets_of(batch)
        has_head = target >= 0
        rows = np.arange(batch.num_rows)
        target_gain = np.where(has_head & valid, delta_p[rows, target], np.nan)
        control_target_gain = np.where(has_head & valid, control_delta_p[rows, target], np.nan)

        # Weights per distinct source in the slice (rows of one image are usually written together).
        ids = _encoded(batch[SOURCE_ID].cast(pa.string()))
        if ids.null_count:
            raise ValueError(f"audit rows: null '{SOURCE_ID}'")
        unique = poisson_weights(
            ids.dictionary.to_pylist(), self.config.bootstrap, self.config.seed
        )  # (U, B)
        weights = unique[ids.indices.to_numpy()]  # (n, B)
        weights[~valid] = 0.0
        return _Chunk(valid, edit, control, delta_p, control_delta_p, target_gain, control_target_gain, weights,
                      scores)  # fmt: skip

    def _group_names(
        self, batch: pa.RecordBatch | pa.Table, spec: tuple[str, ...]
    ) -> tuple[np.ndarray, list]:
        """Per row the index of its subgroup name in the returned list, -1 where a value is missing."""
        codes = np.zeros(batch.num_rows, np.int64)
        missing = np.zeros(batch.num_rows, bool)
        values: list[list[str]] = []
        for g in spec:
            column = _encoded(batch[GROUP + g].cast(pa.string()))
            missing |= column.indices.is_null().to_numpy(zero_copy_only=False)
            values.append(column.dictionary.to_pylist())
            codes = codes * len(values[-1]) + pc.fill_null(column.indices, 0).to_numpy().astype(np.int64)
        unique, inverse = np.unique(codes[~missing], return_inverse=True)
        names = []
        for code in unique.tolist():
            parts = []
            for g, vals in zip(reversed(spec), reversed(values), strict=True):
                code, k = divmod(code, len(vals))
                parts.append(f"{g}={vals[k]}")
            names.append(" & ".join(reversed(parts)))
        out = np.full(batch.num_rows, -1, np.int64)
        out[~missing] = inverse.reshape(-1)
        return out, names

    def _add(self, batch: pa.RecordBatch | pa.Table, chunk: _Chunk) -> None:
        interventions = _encoded(batch[INTERVENTION])
        names_i = interventions.dictionary.to_pylist()
        splits = [self._group_names(batch, spec) for spec in self.subgroups]  # [(codes (n,), names)]
        # The finest partition of the slice: rows alike in intervention and in every split. Each cell
        # of each split is a union of these segments, so one pass over the rows serves every split.
        labels = np.stack(
            [interventions.indices.to_numpy()] + [codes for codes, _ in splits], axis=1
        )  # (n, 1+S)
        segments, segment_of = np.unique(labels, axis=0, return_inverse=True)
        segment_of = segment_of.reshape(-1)
        order = np.argsort(segment_of, kind="stable")
        bounds = np.searchsorted(segment_of[order], np.arange(len(segments) + 1))
        weights = chunk.weights[order]  # (n, B), rows sorted by segment
        for label, lo, hi in zip(segments.tolist(), bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            part = _Cell.of_rows(chunk, order[lo:hi], weights[lo:hi])
            intervention = names_i[label[0]]
            self._cell(intervention, 0, ALL).merge(part)
            for s, (code, (_, names)) in enumerate(zip(label[1:], splits, strict=True)):
                if code >= 0:
                    self._cell(intervention, s + 1, names[code]).merge(part)

    def _cell(self, intervention: str, split: int, subgroup: str) -> _Cell:
        key = (intervention, split, subgroup)
        if key not in self._cells:
            self._cells[key] = _Cell(len(self.attributes), self.config.bootstrap)
        return self._cells[key]

    # -- the tables -----------------------------------------------------------------------

    def result(self) -> AuditTables:
        """The co-change table (sorted: intervention, attribute, subgroup as listed) and the summaries."""
        level = self.config.ci_level
        cochange: dict[str, list] = {c: [] for c in COCHANGE_COLUMNS + COCHANGE_EXTRA_COLUMNS}
        summary: dict[str, list] = {c: [] for c in INTERVENTION_COLUMNS}
        cells = sorted(self._cells.items(), key=lambda kv: kv[0])
        for intervention in sorted({k[0] for k in self._cells}):
            target = self._targets[intervention]
            expected = self.expected.get(intervention, set()) | {target}
            mine = [(key, cell) for key, cell in cells if key[0] == intervention]
            for (_, _, subgroup), cell in mine:
                for column, value in zip(
                    INTERVENTION_COLUMNS,
                    (intervention, subgroup, target, cell.n_rows, cell.n, cell.mean("target_cpg"),
                     cell.mean("control_target_cpg"), cell.mean(ACCEPTED), cell.mean(L1), cell.mean(CONTROL_L1),
                     cell.mean(LPIPS)),
                    strict=True,
                ):  # fmt: skip
                    summary[column].append(value)
            for a, attribute in enumerate(self.attributes):
                for (_, _, subgroup), cell in mine:
                    n = cell.n
                    rate, control_rate = (
                        (cell.changed[a] / n, cell.control_changed[a] / n) if n else (math.nan,) * 2
                    )
                    low, high = _percentile_interval(cell.boot_diff[a], cell.boot_n, level)
                    p = mcnemar_exact(cell.edit_only[a], cell.control_only[a]) if n else math.nan
                    row = {
                        "intervention": intervention, "attribute": attribute, "subgroup": subgroup, "n": n,
                        "change_rate": rate, "control_rate": control_rate, "difference": rate - control_rate,
                        "ci_low": low, "ci_high": high, "p_value": p, "expected": attribute in expected,
                        "mean_delta_p": cell.delta_p[a] / n if n else math.nan,
                        "control_mean_delta_p": cell.control_delta_p[a] / n if n else math.nan,
                        "n_changed": int(cell.changed[a]), "n_control_changed": int(cell.control_changed[a]),
                        "n_edit_only": int(cell.edit_only[a]), "n_control_only": int(cell.control_only[a]),
                    }  # fmt: skip
                    for column, value in row.items():
                        cochange[column].append(value)
        q = benjamini_hochberg(cochange["p_value"])
        cochange["q_value"] = q.tolist()
        cochange["min_q_value"] = min_q_values(cochange["n"], cochange["p_value"]).tolist()
        difference = np.asarray(cochange["difference"], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            flagged = (
                ~np.asarray(cochange["expected"], dtype=bool)
                & (q < self.config.alpha)
                & (np.abs(difference) >= self.config.min_effect)
            )
        cochange["flagged"] = flagged.tolist()
        return AuditTables(
            pa.table(cochange, schema=_COCHANGE_SCHEMA), pa.table(summary, schema=_SUMMARY_SCHEMA)
        )


def _encoded(values: pa.Array | pa.ChunkedArray) -> pa.DictionaryArray:
    """Dictionary-encode one column (nulls stay null in the indices)."""
    encoded = pc.dictionary_encode(values)
    return encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded


def _percentile_interval(diff_sums: np.ndarray, weight_sums: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the replicates' paired difference sum(w (e - c)) / sum(w)."""
    used = weight_sums > 0
    if not used.any():
        return math.nan, math.nan
    replicates = diff_sums[used] / weight_sums[used]
    tail = (1.0 - level) / 2
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


_COCHANGE_SCHEMA = pa.schema(
    [("intervention", pa.string()), ("attribute", pa.string()), ("subgroup", pa.string()), ("n", pa.int64())]
    + [(c, pa.float64()) for c in ("change_rate", "control_rate", "difference", "ci_low", "ci_high", "p_value",
                                   "q_value")]
    + [("expected", pa.bool_()), ("flagged", pa.bool_())]
    + [(c, pa.float64()) for c in COCHANGE_EXTRA_COLUMNS[:2]]
    + [(c, pa.int64()) for c in COCHANGE_EXTRA_COLUMNS[2:6]]
    + [("min_q_value", pa.float64())]
)  # fmt: skip
_SUMMARY_SCHEMA = pa.schema(
    [("intervention", pa.string()), ("subgroup", pa.string()), ("target", pa.string()), ("n_rows", pa.int64()),
     ("n", pa.int64())]
    + [(c, pa.float64()) for c in INTERVENTION_COLUMNS[5:]]
)  # fmt: skip


# --- from Parquet ---------------------------------------------------------------------------


def attributes_of(schema: pa.Schema) -> list[str]:
    """The attributes whose three probability columns the rows carry, in column order."""
    names = schema.names
    attributes = [n[len(P_ORIG) :] for n in names if n.startswith(P_ORIG)]
    missing = [p + a for a in attributes for p in (P_CF, P_CTRL) if p + a not in names]
    if missing:
        raise ValueError(f"audit rows: missing column(s) {missing}")
    return attributes


def audit_statistics(
    rows: str,
    subgroups: Sequence[str | Sequence[str]] = (),
    expected: Mapping[str, Iterable[str]] | None = None,
    config: AuditStatsConfig | None = None,
    *,
    attributes: Sequence[str] | None = None,
    batch_rows: int = 8192,
) -> AuditTables:
    """Stream `rows` (a Parquet file, or a folder of Parquet parts, on any fsspec URI) in record
    batches of `batch_rows`, reading only the needed columns, into the audit's two tables.

    `attributes` default to every attribute with probability columns; `subgroups`, `expected`:
    see `CoChangeAccumulator`.
    """
    fs, path = fsspec.core.url_to_fs(rows)
    if not fs.exists(path):
        raise ValueError(f"rows: no such file or folder '{rows}'")
    files = sorted(fs.glob(path.rstrip("/") + "/**/*.parquet")) if fs.isdir(path) else [path]
    if not files:
        raise ValueError(f"rows: no Parquet file under '{rows}'")
    accumulator = None
    for file in files:
        with fs.open(file, "rb") as f:
            parquet = pq.ParquetFile(f)
            if accumulator is None:
                names = attributes if attributes is not None else attributes_of(parquet.schema_arrow)
                accumulator = CoChangeAccumulator(names, subgroups, expected, config)
            available = parquet.schema_arrow.names
            optional = [c for c in (ACCEPTED, L1, CONTROL_L1, LPIPS) if c in available]
            columns = [c for c in accumulator.required_columns() if c in available] + optional
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                accumulator.update(batch)
    return accumulator.result()
