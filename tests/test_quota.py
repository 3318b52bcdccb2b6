"""The quota planner: deterministic order, distinct sources before reuse, estimates, exact trimming."""

import random

import pytest

from prism_ray.pipelines.quota import (
    PlannerPolicy,
    SlotPool,
    attempts_needed,
    estimate_acceptance,
    kept_prefix,
    plan_round,
    source_order,
)

SOURCES = [f"s3://b/img{i}.png" for i in range(10)]
EDITS = ["Support Devices=false", "Pleural Effusion=false", "Cardiomegaly=true"]


def _pool(name="g", sources=SOURCES, edits=EDITS, seed=0):
    return SlotPool(name, results_hash="h", seed=seed, sources=sources, edits=edits)


def test_order_is_seeded_and_independent_of_row_order():
    shuffled = SOURCES[::-1]
    assert source_order(SOURCES, 0, "x") == source_order(shuffled, 0, "x")
    assert source_order(SOURCES, 0, "x") != source_order(SOURCES, 1, "x")
    assert sorted(source_order(SOURCES + SOURCES[:3], 0, "x")) == sorted(SOURCES)  # duplicates once


def test_distinct_sources_before_reuse_and_every_edit_once_per_source():
    pool = _pool()
    slots = list(pool)
    assert len(slots) == len(SOURCES) * len(EDITS)
    first_pass = slots[: len(SOURCES)]
    assert len({s.source for s in first_pass}) == len(SOURCES)
    # Edits are spread evenly within a pass (10 sources, 3 edits -> 4/3/3).
    counts = sorted(sum(s.edit == e for s in first_pass) for e in EDITS)
    assert counts == [3, 3, 4]
    pairs = {(s.source, s.edit) for s in slots}
    assert len(pairs) == len(slots)  # a reused source always gets a new edit
    assert len({s.slot_id for s in slots}) == len(slots)
    assert [s.rank for s in slots] == list(range(len(slots)))


def test_slot_ids_are_stable_and_depend_on_results_hash():
    a, b = list(_pool()), list(_pool())
    assert [s.slot_id for s in a] == [s.slot_id for s in b]
    other = SlotPool("g", results_hash="other", seed=0, sources=SOURCES, edits=EDITS)
    assert not {s.slot_id for s in a} & {s.slot_id for s in other}


def test_acceptance_estimate_and_round_size():
    assert estimate_acceptance(0, 0, prior=0.5, prior_weight=2) == 0.5
    assert estimate_acceptance(8, 10, prior=0.5, prior_weight=2) == pytest.approx(9 / 12)
    assert estimate_acceptance(0, 100, floor=0.05) == 0.05
    assert attempts_needed(10, 0.5, 1.2) == 24
    assert attempts_needed(3, 1.0, 1.0) == 3
    assert attempts_needed(0, 0.1) == 0
    assert attempts_needed(5, 0.9, 1.0) == 6
    with pytest.raises(ValueError):
        estimate_acceptance(3, 2)


def _simulate(pool, quota, accept_rate, policy, seed=0, max_rounds=20):
    """Run the planner against a fake filter; returns (done, rounds, last progress)."""
    rng = random.Random(seed)
    verdict = {s.slot_id: rng.random() < accept_rate for s in pool}
    done: dict[str, bool] = {}
    for rounds in range(1, max_rounds + 1):
        name = pool.subgroup
        progress = plan_round([pool], {name: quota}, {name: done}, set(), set(), policy)[name]
        if progress.status != "running":
            return done, rounds, progress
        for slot in progress.planned:
            done[slot.slot_id] = verdict[slot.slot_id]
    raise AssertionError("did not finish")


def test_rounds_meet_the_quota_exactly_after_trimming():
    pool = _pool(sources=[f"img{i}" for i in range(200)])
    done, rounds, progress = _simulate(pool, 25, 0.3, PlannerPolicy(over_provision=1.2))
    assert progress.status == "met" and progress.accepted == 25
    kept, accepted = kept_prefix(pool, 25, done)
    assert accepted == 25 and len(kept) <= len(done)
    assert done[kept[-1].slot_id]  # the prefix ends on the quota-th accept
    assert [s.rank for s in kept] == list(range(len(kept)))  # contiguous: a sequential run's rows
    assert rounds <= 5


def test_over_provisioning_reduces_rounds():
    pool = _pool(sources=[f"img{i}" for i in range(500)])
    lean = PlannerPolicy(over_provision=1.0, initial_acceptance=0.25)
    over = PlannerPolicy(over_provision=1.5, initial_acceptance=0.25)
    rounds_lean = sum(_simulate(pool, 50, 0.25, lean, seed)[1] for seed in range(8))
    rounds_over = sum(_simulate(pool, 50, 0.25, over, seed)[1] for seed in range(8))
    assert rounds_over < rounds_lean


def test_shortfall_when_pool_runs_out_and_failed_sources_are_skipped():
    sources = ["a", "b", "c"]
    pool = _pool(sources=sources, edits=["x=1"])
    progress = plan_round([pool], {"g": 5}, {"g": {}}, set(), {"b"})["g"]
    assert {s.source for s in progress.planned} == {"a", "c"}  # b failed to read: never planned
    done = {s.slot_id: False for s in progress.planned}
    progress = plan_round([pool], {"g": 5}, {"g": done}, set(), {"b"})["g"]
    assert progress.status == "shortfall" and progress.shortfall == 5 and progress.accepted == 0


def test_done_rows_beat_a_later_failure_and_quota_zero():
    pool = _pool(sources=["a", "b"], edits=["x=1"])
    first = pool[0]
    done = {first.slot_id: True}
    progress = plan_round([pool], {"g": 1}, {"g": done}, set(), {first.source})["g"]
    assert progress.status == "met" and progress.accepted == 1
    assert plan_round([pool], {"g": 0}, {"g": {}}, set(), set())["g"].status == "met"


def test_samples_pool_is_unbounded_and_needs_no_over_provisioning():
    pool = SlotPool("s", results_hash="h", seed=0, prompt="Chest X-ray showing Cardiomegaly", filtered=False)
    progress = plan_round([pool], {"s": 7}, {"s": {}}, set(), set(), PlannerPolicy(over_provision=2.0))["s"]
    assert [s.sample_index for s in progress.planned] == list(range(7))
    done = {s.slot_id: True for s in progress.planned}
    assert plan_round([pool], {"s": 7}, {"s": done}, set(), set())["s"].status == "met"
    assert kept_prefix(pool, 5, done)[1] == 5  # lowering the quota trims to the first 5


def test_round_budget_is_shared_between_subgroups():
    pools = [_pool("a"), _pool("b")]
    policy = PlannerPolicy(initial_acceptance=1.0, over_provision=1.0, max_attempts_per_round=5)
    progress = plan_round(pools, {"a": 6, "b": 2}, {}, set(), set(), policy)
    assert sum(len(p.planned) for p in progress.values()) == 5
    assert len(progress["a"].planned) > len(progress["b"].planned) >= 1


def test_margin_is_binomial_and_only_after_evidence():
    # 10 more accepts at p = 0.5: 20 expected attempts + 1 sigma: sqrt(10 * 0.5) / 0.5 = 4.47 -> 25.
    assert attempts_needed(10, 0.5, 1.0, margin_sigmas=1.0) == 25
    assert attempts_needed(10, 0.5, 1.0, margin_sigmas=0.0) == 20
    pool = _pool(sources=[f"img{i}" for i in range(200)])
    policy = PlannerPolicy(margin_sigmas=2.0, initial_acceptance=0.5, prior_weight=0.0)
    first = plan_round([pool], {"g": 10}, {"g": {}}, set(), set(), policy)["g"]
    assert len(first.planned) == 20  # no margin on the prior
    done = {s.slot_id: s.rank % 2 == 0 for s in first.planned[:10]}  # 5 of 10 accepted so far
    second = plan_round([pool], {"g": 10}, {"g": done}, set(), set(), policy)["g"]
    assert second.acceptance == 0.5 and len(second.planned) == attempts_needed(5, 0.5, 1.0, 2.0) == 17  # 10 + 2 * sqrt(2.5) / 0.5


def test_first_round_surplus_is_small_at_the_prior_rate():
    """At the true rate equal to the prior, the first round over-delivers by chance only (no margin)."""
    pool = _pool(sources=[f"img{i}" for i in range(2000)])
    surplus = []
    for seed in range(20):
        rng = random.Random(seed)
        first = plan_round([pool], {"g": 200}, {"g": {}}, set(), set(), PlannerPolicy())["g"]
        accepted = sum(rng.random() < 0.5 for _ in first.planned)
        surplus.append(max(0, accepted - 200) / accepted)
    assert sum(surplus) / len(surplus) < 0.05  # ~ E[max(0, Bin(400, .5) - 200)] / 200 = 2 %


def _run_to_quota(pool, quota, verdict, done=None):
    """Rounds of the planner against a fixed verdict per slot, from `done`; returns the in-quota slots."""
    done = dict(done or {})
    for _ in range(50):
        progress = plan_round([pool], {"g": quota}, {"g": done}, set(), set())["g"]
        if progress.status != "running":
            break
        done.update({s.slot_id: verdict[(s.source, s.edit)] for s in progress.planned})
    kept, accepted = kept_prefix(pool, quota, done)
    return [(s.source, s.edit) for s in kept], accepted, done


def test_an_added_intervention_is_planned_like_a_fresh_run():
    """Issue 28.11: finished rows of the old edit list interleave with the new list's order; the gaps
    before the quota-th accept are planned, so the quota set is the fresh run's, not the old rows."""
    sources = [f"img{i}" for i in range(30)]
    verdict = {(s, e): (i + len(e)) % 3 != 0 for i, s in enumerate(sources) for e in ("x=1", "y=1")}
    old = _pool(sources=sources, edits=["x=1"])
    _, _, done = _run_to_quota(old, 6, verdict)
    new = _pool(sources=sources, edits=["x=1", "y=1"])
    resumed, accepted, after = _run_to_quota(new, 6, verdict, done)
    fresh, fresh_accepted, _ = _run_to_quota(new, 6, verdict)
    assert accepted == fresh_accepted == 6
    assert resumed == fresh and any(edit == "y=1" for _, edit in resumed)
    # The old rows were reused, not redone: the new attempts are the gaps, about a fresh run's size.
    assert len(after) - len(done) <= len(fresh)


def test_the_kept_prefix_stops_at_a_gap_and_passes_over_failed_slots():
    pool = _pool(sources=["a", "b", "c", "d"], edits=["x=1"])
    slots = list(pool)
    done = {slots[0].slot_id: True, slots[2].slot_id: True, slots[3].slot_id: True}
    assert kept_prefix(pool, 3, done) == ([slots[0]], 1)  # slot 1 is still to be tried
    assert kept_prefix(pool, 3, done, {slots[1].slot_id}, set()) == ([slots[0], slots[2], slots[3]], 3)
    assert kept_prefix(pool, 3, done, set(), {slots[1].source})[1] == 3  # its source failed: passed over
