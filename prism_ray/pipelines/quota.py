"""Quota planning across rounds: a deterministic attempt order, acceptance estimates, exact trimming.

Pure Python (no Ray, no torch), so every rule here is unit-tested on its own.

Each subgroup owns a *slot pool*: the ordered list of attempts it may make. In counterfactual
mode a slot is (source, intervention); sources are ordered by a seeded hash, and the pool runs
through them in passes: pass p gives the source at position j the intervention (j + p) mod K.
So every distinct source is used once before any source is reused, interventions are spread
evenly within a pass, and a reused source always gets an intervention it has not had. In
samples mode a slot is a sample index (an unbounded pool).

The contract with the job: the *in-quota* rows of a subgroup are the prefix of its pool, in rank
order, up to and including the quota-th accepted attempt. That is what one sequential worker
would have produced, whatever the rounds, over-provisioning, batching or crashes were. Every
done attempt after that prefix is *beyond quota*: kept (never deleted), and the first to count
when the quota is raised, because it sits earliest in the order after the prefix. A pool changed
under finished work (an intervention or a source added) interleaves new slots with the finished
ones: those gaps end the prefix until they are done, so a resumed run keeps the quota set a fresh
run of the same config would have, and reuses every finished attempt it reaches.

Round sizing: the first round plans remaining / prior attempts (no margin: a margin on a guess
only inflates the surplus); later rounds plan remaining / p_hat plus `margin_sigmas` binomial
standard deviations, so a round rarely falls short and its surplus stays small.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from prism_ray.results.layout import digest

Status = Literal["met", "running", "shortfall", "incomplete"]


def slot_id_of(
    results_hash: str, subgroup: str, source: str | None, edit: str, sample_index: int | None = None
) -> str:
    """Deterministic id of one planned attempt, known before any image is read (for resume)."""
    index = "" if sample_index is None else sample_index
    return digest("slot", results_hash, subgroup, source or "", edit, index)


def source_order(sources: Sequence[str], seed: int, salt: str) -> list[str]:
    """Sources sorted by a seeded hash: deterministic, and stable when rows are added or reordered."""
    unique = list(dict.fromkeys(sources))
    return sorted(unique, key=lambda s: (digest("order", seed, salt, s), s))


@dataclass(frozen=True)
class Slot:
    """One attempt a subgroup may make; `rank` is its place in the subgroup's order."""

    subgroup: str
    rank: int
    slot_id: str
    source: str | None  # source URI (counterfactual mode); None for samples
    edit: str  # compact intervention string, or the sampling prompt
    sample_index: int | None = None


class SlotPool:
    """A subgroup's attempts in order, computed lazily from (sources, edits, seed)."""

    def __init__(
        self,
        subgroup: str,
        *,
        results_hash: str,
        seed: int,
        sources: Sequence[str] = (),
        edits: Sequence[str] = (),
        prompt: str | None = None,
        filtered: bool = True,
    ):
        if prompt is None and not edits:
            raise ValueError(f"subgroup {subgroup!r}: a counterfactual pool needs at least one edit")
        self.subgroup = subgroup
        self.results_hash = results_hash
        self.prompt = prompt
        self.edits = list(edits)
        self.filtered = filtered  # False: every attempt counts as accepted (samples)
        self.sources = source_order(sources, seed, f"{results_hash}:{subgroup}") if prompt is None else []

    @property
    def samples(self) -> bool:
        return self.prompt is not None

    def contains(self, slot_id: str, rank: int | None) -> bool:
        """Whether a finished attempt belongs to this pool as configured now (selectors and edits may
        have changed since it was done)."""
        if self.samples:
            return rank is not None and 0 <= rank and self[rank].slot_id == slot_id
        if not hasattr(self, "_ids"):
            self._ids = {slot_id_of(self.results_hash, self.subgroup, s, e) for s in self.sources for e in self.edits}
        return slot_id in self._ids

    def __len__(self) -> int:
        # Samples are unbounded; a very large length keeps len() and slicing honest.
        return 2**62 if self.samples else len(self.sources) * len(self.edits)

    def __getitem__(self, rank: int) -> Slot:
        if not 0 <= rank < len(self):
            raise IndexError(rank)
        if self.samples:
            sid = slot_id_of(self.results_hash, self.subgroup, None, self.prompt, rank)
            return Slot(self.subgroup, rank, sid, None, self.prompt, rank)
        passes, j = divmod(rank, len(self.sources))
        edit = self.edits[(j + passes) % len(self.edits)]
        source = self.sources[j]
        sid = slot_id_of(self.results_hash, self.subgroup, source, edit)
        return Slot(self.subgroup, rank, sid, source, edit)

    def __iter__(self) -> Iterator[Slot]:
        rank = 0
        while rank < len(self):
            yield self[rank]
            rank += 1


# --- acceptance estimate and round size ------------------------------------------------------


def estimate_acceptance(
    accepted: int, attempted: int, *, prior: float = 0.5, prior_weight: float = 2.0, floor: float = 0.05
) -> float:
    """Posterior mean of a Beta prior (mean `prior`, `prior_weight` pseudo-attempts), floored."""
    if accepted < 0 or attempted < accepted:
        raise ValueError(f"need 0 <= accepted <= attempted, got {accepted}/{attempted}")
    weight = attempted + prior_weight
    p = (accepted + prior * prior_weight) / weight if weight > 0 else prior
    return min(1.0, max(p, floor))


def attempts_needed(
    remaining: int, acceptance: float, over_provision: float = 1.0, margin_sigmas: float = 0.0
) -> int:
    """Attempts expected to yield `remaining` accepts at `acceptance`, times `over_provision`,
    plus `margin_sigmas` standard deviations of the binomial shortfall; at least `remaining`."""
    if remaining <= 0:
        return 0
    if not 0.0 < acceptance <= 1.0:
        raise ValueError(f"acceptance must be in (0, 1], got {acceptance}")
    expected = remaining * over_provision / acceptance
    # n attempts give n*p +- sqrt(n*p*(1-p)) accepts; at n ~ remaining/p the spread in attempts is:
    margin = margin_sigmas * math.sqrt(remaining * (1.0 - acceptance)) / acceptance
    return max(remaining, math.ceil(expected + margin - 1e-9))


# --- state, rounds and trimming --------------------------------------------------------------


@dataclass
class SubgroupProgress:
    """Where one subgroup stands after the attempts done so far (before trimming)."""

    name: str
    quota: int
    accepted: int = 0  # in the kept prefix
    attempted: int = 0  # done attempts in the kept prefix (accepted + rejected)
    skipped: int = 0  # slots passed over while planning because their source or edit failed
    acceptance: float = 0.0  # estimate used to size the next round
    status: Status = "running"
    planned: list[Slot] = field(default_factory=list)  # this round's attempts

    @property
    def shortfall(self) -> int:
        return max(0, self.quota - self.accepted)


@dataclass(frozen=True)
class PlannerPolicy:
    over_provision: float = 1.0
    margin_sigmas: float = 1.0
    initial_acceptance: float = 0.5
    prior_weight: float = 2.0
    min_acceptance: float = 0.05
    max_attempts_per_round: int | None = None

    @classmethod
    def from_config(cls, planner) -> PlannerPolicy:
        return cls(
            planner.over_provision,
            planner.margin_sigmas,
            planner.initial_acceptance,
            planner.prior_weight,
            planner.min_acceptance,
            planner.max_attempts_per_round,
        )


def _usable(slot: Slot, failed_slots: set[str], failed_sources: set[str]) -> bool:
    return slot.slot_id not in failed_slots and (slot.source is None or slot.source not in failed_sources)


def kept_prefix(
    pool: SlotPool,
    quota: int,
    done: Mapping[str, bool],
    failed_slots: Set[str] = frozenset(),
    failed_sources: Set[str] = frozenset(),
) -> tuple[list[Slot], int]:
    """Done slots of the pool's prefix up to the quota-th accepted one, in rank order.

    `done`: slot_id -> accepted, for this subgroup's finished attempts. Returns (kept slots,
    accepted among them). Walks the pool only as far as needed. A failed slot (its edit, or its
    source, failed for good) is passed over; the first slot that is neither done nor failed ends
    the prefix: one sequential worker would try it next, so the done slots after it are not in
    the quota set yet. Such gaps open when the pool changes under finished work (an intervention
    or a source added: the new slots interleave with the old ones) or a round was cut short.
    """
    kept: list[Slot] = []
    accepted = seen = 0
    total = len(done)
    if quota == 0 or total == 0:
        return kept, 0
    for slot in pool:
        # A finished attempt counts even if its source failed later (e.g. a transient read error).
        if slot.slot_id in done:
            seen += 1
            kept.append(slot)
            accepted += bool(done[slot.slot_id]) or not pool.filtered
            if accepted >= quota or seen >= total:
                break
        elif _usable(slot, failed_slots, failed_sources):
            break  # still to be tried: the prefix ends before it
    return kept, accepted


def plan_round(
    pools: Sequence[SlotPool],
    quotas: Mapping[str, int],
    done: Mapping[str, Mapping[str, bool]],
    failed_slots: set[str],
    failed_sources: set[str],
    policy: PlannerPolicy = PlannerPolicy(),
) -> dict[str, SubgroupProgress]:
    """Next round: for each unfinished subgroup, the next pending slots in rank order.

    `done[subgroup]`: slot_id -> accepted. A subgroup's attempts are sized from its own
    acceptance so far (over-provisioned); a subgroup whose pool has no pending slot left is a
    shortfall. With `max_attempts_per_round`, the budget is shared in proportion to need.
    """
    progress: dict[str, SubgroupProgress] = {}
    for pool in pools:
        name, quota = pool.subgroup, quotas[pool.subgroup]
        finished = done.get(name, {})
        kept, accepted = kept_prefix(pool, quota, finished, failed_slots, failed_sources)
        state = SubgroupProgress(name, quota, accepted=accepted, attempted=len(kept))
        if accepted >= quota:
            state.status = "met"
            state.acceptance = accepted / max(len(kept), 1)
            progress[name] = state
            continue
        if pool.filtered:
            state.acceptance = estimate_acceptance(
                accepted,
                len(kept),
                prior=policy.initial_acceptance,
                prior_weight=policy.prior_weight,
                floor=policy.min_acceptance,
            )
            # No margin before any evidence: the prior is a guess, and a margin on it is surplus.
            sigmas = policy.margin_sigmas if len(kept) else 0.0
            want = partial(attempts_needed, acceptance=state.acceptance, over_provision=policy.over_provision,
                           margin_sigmas=sigmas)
        else:
            state.acceptance, want = 1.0, lambda remaining: max(remaining, 0)
        # Finished attempts after the prefix's first gap (an interleaved new intervention, say) count
        # once the gaps before them are done: the round plans the gaps for the accepts still missing.
        ahead, gap = 0, False
        for slot in pool:
            if len(state.planned) >= want(quota - accepted - ahead):
                break
            if slot.slot_id in finished:
                ahead += gap and (bool(finished[slot.slot_id]) or not pool.filtered)
            elif not _usable(slot, failed_slots, failed_sources):
                state.skipped += 1
            else:
                gap = True
                state.planned.append(slot)
        if not state.planned:
            state.status = "shortfall"
        progress[name] = state
    budget = policy.max_attempts_per_round
    wanted = sum(len(s.planned) for s in progress.values())
    if budget is not None and wanted > budget:
        # Share the cap in proportion to need (largest remainders), keeping each list's order.
        shares = {n: len(s.planned) * budget / wanted for n, s in progress.items()}
        take = {n: int(v) for n, v in shares.items()}
        for n in sorted(shares, key=lambda n: (take[n] - shares[n], n))[: budget - sum(take.values())]:
            take[n] += 1
        for n, s in progress.items():
            s.planned = s.planned[: max(take[n], 1 if s.planned else 0)]
    return progress
