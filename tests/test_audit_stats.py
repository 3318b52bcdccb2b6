"""Audit co-change statistics: hand-made tables, simulations of the CI and the test, streaming = in-memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prism_ray.scoring.audit_stats import (
    COCHANGE_COLUMNS,
    CONTROL,
    GROUP,
    P_CF,
    P_CTRL,
    P_ORIG,
    AuditStatsConfig,
    CoChangeAccumulator,
    audit_statistics,
    benjamini_hochberg,
    images_needed,
    mcnemar_exact,
    min_q_values,
    poisson_weights,
)

FAST = AuditStatsConfig(bootstrap=200)


def paired_rows(edit: np.ndarray, control: np.ndarray, rng: np.random.Generator, names: list[str]) -> dict:
    """Probability columns whose decisions change exactly where `edit` / `control` (n, A) say."""
    cols = {}
    for a, name in enumerate(names):
        p_orig = rng.choice([0.2, 0.8], size=edit.shape[0])
        cols[P_ORIG + name] = p_orig
        cols[P_CF + name] = np.where(edit[:, a], 1.0 - p_orig, p_orig + 0.05 * (p_orig < 0.5))
        cols[P_CTRL + name] = np.where(control[:, a], 1.0 - p_orig, p_orig)
    return cols


def one_intervention(n: int, cols: dict, intervention: str = "Cardiomegaly=0", target: str = "cardiomegaly"):
    return pa.table(
        {
            "source_id": [f"img-{i}" for i in range(n)],
            "intervention": [intervention] * n,
            "target": [target] * n,
        }
        | cols
    )


def cells(table: pa.Table) -> dict:
    rows = table.to_pylist()
    return {(r["intervention"], r["attribute"], r["subgroup"]): r for r in rows}


# --- hand-made tables ---------------------------------------------------------------------


def test_known_change_rates_on_a_hand_made_table():
    # Four images. Cardiomegaly (target) flips under the edit in 3/4, under the control in 0/4; the
    # pacemaker in 2/4 and 1/4. A control-only row and a row with a missing probability are left out.
    table = pa.table(
        {
            "source_id": ["a", "b", "c", "d", "a", "e"],
            "intervention": ["Cardiomegaly=0"] * 4 + [CONTROL, "Cardiomegaly=0"],
            "target": ["cardiomegaly"] * 4 + [None, "cardiomegaly"],
            P_ORIG + "cardiomegaly": [0.9, 0.8, 0.7, 0.2, 0.9, 0.9],
            P_CF + "cardiomegaly": [0.1, 0.3, 0.4, 0.1, 0.9, None],
            P_CTRL + "cardiomegaly": [0.85, 0.8, 0.6, 0.3, 0.9, 0.9],
            P_ORIG + "pacemaker": [0.9, 0.9, 0.1, 0.1, 0.9, 0.9],
            P_CF + "pacemaker": [0.2, 0.3, 0.1, 0.1, 0.9, 0.9],
            P_CTRL + "pacemaker": [0.2, 0.9, 0.1, 0.1, 0.9, 0.9],
            GROUP + "sex": ["female", "male", "female", None, "female", "male"],
            "accepted": [True, True, False, True, True, False],
            "l1": [0.02, 0.04, 0.06, 0.08, 0.0, 1.0],
        }
    )
    acc = CoChangeAccumulator(["cardiomegaly", "pacemaker"], ["sex"], config=FAST)
    acc.update(table)
    co, summary = acc.result()
    assert co.column_names[: len(COCHANGE_COLUMNS)] == list(COCHANGE_COLUMNS)
    got = cells(co)
    assert list(got) == [
        ("Cardiomegaly=0", "cardiomegaly", "all"), ("Cardiomegaly=0", "cardiomegaly", "sex=female"),
        ("Cardiomegaly=0", "cardiomegaly", "sex=male"), ("Cardiomegaly=0", "pacemaker", "all"),
        ("Cardiomegaly=0", "pacemaker", "sex=female"), ("Cardiomegaly=0", "pacemaker", "sex=male"),
    ]  # fmt: skip
    target = got["Cardiomegaly=0", "cardiomegaly", "all"]
    assert (target["n"], target["change_rate"], target["control_rate"]) == (4, 0.75, 0.0)
    assert target["expected"] and not target["flagged"]
    assert target["mean_delta_p"] == pytest.approx((0.8 + 0.5 + 0.3 + 0.1) / 4)
    assert target["control_mean_delta_p"] == pytest.approx((0.05 + 0.0 + 0.1 + 0.1) / 4)
    pm = got["Cardiomegaly=0", "pacemaker", "all"]
    assert (pm["change_rate"], pm["control_rate"], pm["difference"]) == (0.5, 0.25, 0.25)
    assert (pm["n_edit_only"], pm["n_control_only"], pm["p_value"]) == (1, 0, 1.0)  # 2 * P(X <= 0 | m = 1)
    assert not pm["expected"]
    female = got["Cardiomegaly=0", "pacemaker", "sex=female"]
    assert (female["n"], female["change_rate"], female["control_rate"]) == (2, 0.5, 0.5)
    assert got["Cardiomegaly=0", "pacemaker", "sex=male"]["n"] == 1  # "e" has no valid pacemaker row
    s = {r["subgroup"]: r for r in summary.to_pylist()}
    assert s["all"]["n_rows"] == 5 and s["all"]["n"] == 4
    assert s["all"]["target_cpg"] == pytest.approx(target["mean_delta_p"])
    assert s["all"]["acceptance_rate"] == pytest.approx(3 / 5)
    assert s["all"]["mean_l1"] == pytest.approx((0.02 + 0.04 + 0.06 + 0.08 + 1.0) / 5)
    assert s["sex=male"]["n_rows"] == 2 and math.isnan(s["all"]["mean_lpips"])


def test_expected_and_flagged():
    # 4000 images. Pacemaker: a large co-change, flagged. Tube: the same co-change but declared
    # implied, so expected. Ecg: significant (q << alpha) but below min_effect. Noise: no effect.
    rng = np.random.default_rng(3)
    n = 4000
    names = ["cardiomegaly", "pacemaker", "tube", "ecg", "noise"]
    edit_rate = np.array([0.9, 0.4, 0.4, 0.07, 0.1])
    control_rate = np.array([0.02, 0.02, 0.02, 0.02, 0.1])
    edit, control = rng.random((n, 5)) < edit_rate, rng.random((n, 5)) < control_rate
    table = one_intervention(n, paired_rows(edit, control, rng, names))
    acc = CoChangeAccumulator(names, expected={"Cardiomegaly=0": ["tube"]}, config=FAST)
    acc.update(table)
    got = {r["attribute"]: r for r in acc.result().cochange.to_pylist()}
    assert [got[a]["expected"] for a in names] == [True, False, True, False, False]
    assert [got[a]["flagged"] for a in names] == [False, True, False, False, False]
    assert got["ecg"]["q_value"] < 1e-6 and abs(got["ecg"]["difference"]) < 0.05
    assert got["noise"]["q_value"] > 0.01
    strict = CoChangeAccumulator(names, config=AuditStatsConfig(bootstrap=200, min_effect=0.0))
    strict.update(table)
    got = {r["attribute"]: r for r in strict.result().cochange.to_pylist()}
    assert [got[a]["flagged"] for a in names] == [False, True, True, True, False]


def test_mcnemar_exact_against_the_binomial_sum():
    for b, c in [(0, 0), (1, 0), (3, 7), (10, 0), (25, 40), (500, 430)]:
        m, k = b + c, min(b, c)
        plain = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, j) for j in range(k + 1)) / 2**m)
        assert mcnemar_exact(b, c) == pytest.approx(plain, rel=1e-9)


def test_benjamini_hochberg_against_a_plain_implementation():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(60) ** 3, [0.01, 0.01, 0.5, 1.0, np.nan]])
    ok = p[~np.isnan(p)]
    m = ok.size
    rank = {v: max(i + 1 for i, w in enumerate(np.sort(ok)) if w == v) for v in ok}  # ties share the top rank
    plain = [min(1.0, min(w * m / rank[w] for w in ok if w >= v)) for v in ok]
    q = benjamini_hochberg(p)
    np.testing.assert_allclose(q[~np.isnan(p)], plain, rtol=1e-12)
    assert np.isnan(q[-1])


def test_min_q_is_the_bh_q_of_the_cells_best_case():
    # Brute force: the row's p replaced by McNemar's p for n of n images changed by the edit alone, then BH.
    rng = np.random.default_rng(5)
    for trial in range(200):
        m = int(rng.integers(1, 25))
        n = rng.integers(0, 20, size=m)
        p = np.array([mcnemar_exact(rng.integers(0, k + 1), rng.integers(0, k + 1)) if k else np.nan for k in n])
        if trial % 3 == 0:
            p[rng.integers(0, m, size=m // 2)] = p[0]  # ties
        got = min_q_values(n, p)
        for i in range(m):
            if np.isnan(p[i]):
                assert np.isnan(got[i])
                continue
            best = p.copy()
            best[i] = min(mcnemar_exact(int(n[i]), 0), p[i])
            assert got[i] == pytest.approx(benjamini_hochberg(best)[i], rel=1e-12)


def test_a_cell_of_eleven_images_cannot_be_flagged_in_the_readme_audit():
    # The README audit's shape: 40 test images (200 phantoms), 11 with cardiomegaly, 16 with devices, 10 with
    # effusion; the tiny classifier's 5 heads; subgroups Cardiomegaly and Support Devices. Each target flips in
    # 4 of 5 images; do(Cardiomegaly=0) flips the pacemaker in 11/11 images and in 0/11 controls: the best the
    # paired test can see in 11 images, still q >= 0.01 after BH over the table's 85 tests.
    rng = np.random.default_rng(0)
    names = ["cardiomegaly", "pleural_effusion", "support_devices", "pacemaker", "sex_female"]
    i = np.arange(40)
    cardiomegaly, devices, effusion = i < 11, (i < 6) | (i >= 30), i % 4 == 0
    acc = CoChangeAccumulator(names, ["Cardiomegaly", "Support Devices"], config=FAST)
    for intervention, target, chosen in (("Cardiomegaly=0", "cardiomegaly", cardiomegaly),
                                         ("Cardiomegaly=1", "cardiomegaly", ~cardiomegaly),
                                         ("Pleural Effusion=0", "pleural_effusion", effusion),
                                         ("Support Devices=0", "support_devices", devices)):  # fmt: skip
        n = int(chosen.sum())
        edit = np.zeros((n, len(names)), bool)
        edit[:, names.index(target)] = np.arange(n) % 5 != 0
        if intervention == "Cardiomegaly=0":
            edit[:, names.index("pacemaker")] = True  # the perfect co-change
        table = one_intervention(n, paired_rows(edit, np.zeros_like(edit), rng, names), intervention, target)
        table = table.set_column(0, "source_id", pa.array([f"img-{k}" for k in i[chosen]]))
        for column, values in (("Cardiomegaly", cardiomegaly), ("Support Devices", devices)):
            table = table.append_column(GROUP + column, pa.array([str(int(v)) for v in values[chosen]]))
        acc.update(table)
    co = acc.result().cochange
    assert "min_q_value" in co.column_names and co.schema.field("min_q_value").type == pa.float64()
    cell = cells(co)["Cardiomegaly=0", "pacemaker", "all"]
    assert (cell["n"], cell["n_edit_only"], cell["n_control_only"]) == (11, 11, 0)
    assert cell["p_value"] == pytest.approx(2**-10)  # the best the paired test can do with 11 images
    assert cell["min_q_value"] == pytest.approx(cell["q_value"]) and cell["min_q_value"] >= 0.01
    assert co.num_rows == 85
    assert not cell["flagged"]
    # A cell of 29 images could reach it; the table says how many images a cell needs.
    assert cells(co)["Cardiomegaly=1", "pacemaker", "all"]["min_q_value"] < 0.01
    needed = images_needed(co.column("p_value").to_numpy(zero_copy_only=False), 0.01)
    assert 11 < needed <= 29
    assert images_needed([1.0] * 80, 0.01) == 14  # 2^(1 - n) * 80 < 0.01 from n = 14
    assert images_needed([1.0] * 80, 1e-300, max_n=100) is None


def test_poisson_weights_are_a_seeded_function_of_the_source():
    ids = [f"s{i}" for i in range(4000)]
    w = poisson_weights(ids, 500, seed=7)
    assert w.shape == (4000, 500) and w.dtype == np.float32
    np.testing.assert_array_equal(poisson_weights(ids[::-1], 500, seed=7), w[::-1])
    assert not np.array_equal(poisson_weights(ids[:10], 500, seed=8), w[:10])
    assert w.mean() == pytest.approx(1.0, abs=0.005) and w.var() == pytest.approx(1.0, abs=0.01)
    assert (w == 0).mean() == pytest.approx(math.exp(-1), abs=0.003)


# --- simulations --------------------------------------------------------------------------


def test_bootstrap_ci_covers_a_known_effect_95_percent_of_the_time():
    # 4 tables x 50 attributes = 200 independent draws of 400 paired images with a true edit change
    # rate 0.30 and control change rate 0.10 (correlated within an image): difference 0.20.
    hits, draws = 0, 0
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        n, attributes = 400, 50
        shared = rng.random((n, attributes))
        edit = shared < 0.30
        control = np.where(
            rng.random((n, attributes)) < 0.5, shared < 0.10, rng.random((n, attributes)) < 0.10
        )
        names = [f"head{a}" for a in range(attributes)]
        acc = CoChangeAccumulator(names, config=AuditStatsConfig(bootstrap=1000, seed=seed))
        acc.update(one_intervention(n, paired_rows(edit, control, rng, names)))
        co = acc.result().cochange
        low, high = np.array(co["ci_low"]), np.array(co["ci_high"])
        hits += int(((low <= 0.2) & (0.2 <= high)).sum())
        draws += attributes
    coverage = hits / draws
    # Binomial sd of the coverage over 200 draws is 1.5 %; the percentile interval runs slightly short.
    assert 0.90 <= coverage <= 0.99, coverage


def test_p_values_are_uniform_under_the_null():
    # 400 attributes whose edit and control flips are exchangeable (both 50 %, independent): the
    # McNemar p-values should be ~U(0, 1). KS distance against the uniform CDF, by hand. The exact
    # test is discrete and slightly conservative; with ~2500 discordant pairs per attribute its
    # atoms are small enough for the KS test (simulated: 1.7 % of seeds exceed the 1 % critical value).
    rng = np.random.default_rng(0)
    n, attributes = 5000, 400
    edit, control = rng.random((n, attributes)) < 0.5, rng.random((n, attributes)) < 0.5
    names = [f"head{a}" for a in range(attributes)]
    acc = CoChangeAccumulator(names, config=FAST)
    acc.update(one_intervention(n, paired_rows(edit, control, rng, names), target="head0"))
    p = np.sort(np.array(acc.result().cochange["p_value"]))
    ecdf_hi, ecdf_lo = np.arange(1, p.size + 1) / p.size, np.arange(p.size) / p.size
    ks = max(np.max(ecdf_hi - p), np.max(p - ecdf_lo))
    assert ks < 1.63 / math.sqrt(p.size), ks  # the KS test's 1 % critical value
    assert np.mean(p < 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / p.size)  # valid: not anti-conservative


# --- streaming ----------------------------------------------------------------------------


def mixed_table(seed: int = 5, sources: int = 120) -> pa.Table:
    """Three interventions on overlapping sources, two subgroup columns with missing values."""
    rng = np.random.default_rng(seed)
    names = ["cardiomegaly", "pacemaker", "sex_female"]
    parts = []
    for k, (intervention, target) in enumerate(
        [("Cardiomegaly=0", "cardiomegaly"), ("sex=flip", "sex_female"), ("age=+20", "age_bin")]
    ):
        ids = np.flatnonzero(rng.random(sources) < 0.8)
        edit = rng.random((ids.size, 3)) < [0.5, 0.3 - 0.1 * k, 0.2]
        control = rng.random((ids.size, 3)) < 0.1
        cols = paired_rows(edit, control, rng, names)
        cols[P_CF + "pacemaker"][::17] = np.nan
        sex = np.where(ids % 3 == 0, None, np.where(ids % 2 == 0, "female", "male"))
        parts.append(
            pa.table(
                {
                    "source_id": [f"img-{i}" for i in ids],
                    "intervention": [intervention] * ids.size,
                    "target": [target] * ids.size,
                    **cols,
                    GROUP + "sex": sex.tolist(),
                    GROUP + "age": [str(20 * (i % 4)) for i in ids],
                    "accepted": rng.random(ids.size) < 0.7,
                    "l1": rng.random(ids.size),
                }
            )
        )
    return pa.concat_tables(parts)


def in_memory_reference(table: pa.Table, names: list[str], config: AuditStatsConfig) -> dict:
    """The statistics computed the obvious way from the whole table (no streaming, no sufficient statistics)."""
    rows = table.to_pylist()
    ids = [r["source_id"] for r in rows]
    weights = poisson_weights(ids, config.bootstrap, config.seed).astype(np.float64)  # (N, B)
    groups = {"all": lambda r: True}
    for g in ("sex", "age", ("sex", "age")):
        spec = (g,) if isinstance(g, str) else g
        values = sorted({tuple(r[GROUP + c] for c in spec) for r in rows if all(r[GROUP + c] for c in spec)})
        for v in values:
            label = " & ".join(f"{c}={x}" for c, x in zip(spec, v, strict=True))
            groups[label] = lambda r, spec=spec, v=v: tuple(r[GROUP + c] for c in spec) == v
    out = {}
    t = config.threshold
    for intervention in sorted({r["intervention"] for r in rows}):
        for a in names:
            for label, member in groups.items():
                keep = [
                    i for i, r in enumerate(rows)
                    if r["intervention"] == intervention and member(r)
                    and all(r[p + a2] is not None and not math.isnan(r[p + a2]) for a2 in names
                            for p in (P_ORIG, P_CF, P_CTRL))
                ]  # fmt: skip
                if not any(r["intervention"] == intervention and member(r) for r in rows):
                    continue
                e = np.array([(rows[i][P_CF + a] >= t) != (rows[i][P_ORIG + a] >= t) for i in keep], float)
                c = np.array([(rows[i][P_CTRL + a] >= t) != (rows[i][P_ORIG + a] >= t) for i in keep], float)
                w = weights[keep]
                used = w.sum(0) > 0
                replicates = ((e - c) @ w)[used] / w.sum(0)[used]
                b, cc = int(((e == 1) & (c == 0)).sum()), int(((e == 0) & (c == 1)).sum())
                m = b + cc
                p = (
                    1.0
                    if m == 0
                    else min(1.0, 2 * sum(math.comb(m, j) for j in range(min(b, cc) + 1)) / 2**m)
                )
                out[intervention, a, label] = {
                    "n": len(keep), "change_rate": e.mean(), "control_rate": c.mean(),
                    "ci_low": np.quantile(replicates, 0.025), "ci_high": np.quantile(replicates, 0.975),
                    "p_value": p,
                }  # fmt: skip
    return out


SUBGROUPS = ["sex", "age", ("sex", "age")]


def test_streaming_equals_in_memory_for_any_batching_and_order(tmp_path):
    table = mixed_table()
    names = ["cardiomegaly", "pacemaker", "sex_female"]
    config = AuditStatsConfig(bootstrap=300, seed=4)
    reference = in_memory_reference(table, names, config)

    whole = CoChangeAccumulator(names, SUBGROUPS, config=config)
    whole.update(table)
    first = whole.result()
    got = cells(first.cochange)
    assert set(got) == set(reference)
    for key, want in reference.items():
        for column, value in want.items():
            assert got[key][column] == pytest.approx(value, rel=1e-9, abs=1e-12), (key, column)

    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    for batch_rows in (1, 7, 64):
        acc = CoChangeAccumulator(names, SUBGROUPS, config=config)
        for batch in shuffled.to_batches(max_chunksize=batch_rows):
            acc.update(batch)
        result = acc.result()
        exact = [c for c in first.cochange.column_names if c not in ("mean_delta_p", "control_mean_delta_p")]
        assert result.cochange.select(exact).equals(first.cochange.select(exact)), batch_rows
        np.testing.assert_allclose(
            result.cochange["mean_delta_p"], first.cochange["mean_delta_p"], rtol=1e-12
        )
        np.testing.assert_allclose(
            result.interventions["mean_l1"], first.interventions["mean_l1"], rtol=1e-12
        )

    # From Parquet: one file, and a folder of parts, in small record batches.
    pq.write_table(shuffled, tmp_path / "rows.parquet", row_group_size=50)
    (tmp_path / "parts").mkdir()
    for i, start in enumerate(range(0, shuffled.num_rows, 100)):
        pq.write_table(shuffled.slice(start, 100), tmp_path / "parts" / f"{i:03d}.parquet")
    for uri in (str(tmp_path / "rows.parquet"), str(tmp_path / "parts")):
        result = audit_statistics(uri, SUBGROUPS, config=config, batch_rows=33)
        assert result.cochange.select(exact).equals(first.cochange.select(exact)), uri
        assert result.interventions.num_rows == first.interventions.num_rows


def test_bad_rows_are_refused():
    acc = CoChangeAccumulator(["cardiomegaly"], config=FAST)
    with pytest.raises(ValueError, match="missing column"):
        acc.update(pa.table({"source_id": ["a"], "intervention": ["X=0"], "target": ["x"]}))
    cols = {
        P_ORIG + "cardiomegaly": [0.1, 0.1],
        P_CF + "cardiomegaly": [0.9, 0.9],
        P_CTRL + "cardiomegaly": [0.1] * 2,
    }
    table = pa.table({"source_id": ["a", "b"], "intervention": ["X=0"] * 2, "target": ["x", "y"], **cols})
    with pytest.raises(ValueError, match="has targets"):
        acc.update(table)
    with pytest.raises(ValueError, match="subgroups"):
        CoChangeAccumulator(["cardiomegaly"], [()])


# --- a million rows -----------------------------------------------------------------------

MILLION = textwrap.dedent(
    r"""
    import json, re, sys, time
    import pyarrow.compute, pyarrow.acero, pyarrow.parquet  # imports are not the statistics' memory
    from prism_ray.scoring.audit_stats import AuditStatsConfig, audit_statistics
    # VmHWM: this process's peak resident memory (ru_maxrss would carry the forking parent's over exec).
    status = lambda: open("/proc/self/status").read()
    peak = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", status()).group(1)) * 1024
    before, start = peak(), time.perf_counter()
    tables = audit_statistics(sys.argv[1], ["sex", "age", ["sex", "age"]], config=AuditStatsConfig())
    print(json.dumps({"seconds": time.perf_counter() - start, "rss_growth": peak() - before,
                      "cells": tables.cochange.num_rows, "n": tables.cochange["n"][0].as_py()}))
    """
)


def write_million_rows(path, sources: int = 250_000, chunk: int = 16_384) -> int:
    """1M rows (4 interventions x 250k sources, 5 attributes) written in row groups of 64k rows, with
    the text columns an audit row also carries (ids, URIs, prompts). Returns the table's in-memory size."""
    rng = np.random.default_rng(0)
    interventions = ["Cardiomegaly=0", "Cardiomegaly=1", "sex=flip", "age=+20"]
    names = ["cardiomegaly", "pacemaker", "pleural_effusion", "sex_female", "support_devices"]
    nbytes, writer = 0, None
    for start in range(0, sources, chunk):
        s = np.arange(start, min(start + chunk, sources))
        n = s.size * 4
        ids = np.repeat(np.char.add("img-", s.astype(str)), 4)
        cols = {
            "row_id": np.char.add("row-", np.arange(4 * start, 4 * start + n).astype(str)),
            "source_uri": np.char.add("s3://bucket/mimic/files/p10/", np.char.add(ids, ".jpg")),
            "source_id": ids, "intervention": np.tile(interventions, s.size),
            "target": np.tile(["cardiomegaly", "cardiomegaly", "sex_female", "age_bin"], s.size),
            "source_prompt": np.full(n, "Chest X-ray of 60-years old female subject with cardiomegaly"),
            "edit_prompt": np.full(n, "Chest X-ray of 60-years old female subject with no finding"),
            "image_uri": np.char.add("s3://bucket/audit/images/3f2a9c1e/", np.char.add(ids, ".png")),
            "control_uri": np.char.add("s3://bucket/audit/images/control/", np.char.add(ids, ".png")),
            GROUP + "sex": np.repeat(rng.choice(["female", "male"], s.size), 4),
            GROUP + "age": np.repeat(rng.choice(["20", "40", "60", "80"], s.size), 4),
        }  # fmt: skip
        for a in names:
            p_orig = np.repeat(rng.random(s.size), 4)
            cols[P_ORIG + a] = p_orig.astype(np.float32)
            cols[P_CTRL + a] = np.where(rng.random(n) < 0.05, 1 - p_orig, p_orig).astype(np.float32)
            cols[P_CF + a] = np.where(rng.random(n) < 0.10, 1 - p_orig, p_orig).astype(np.float32)
        cols |= {"accepted": rng.random(n) < 0.8, "l1": rng.random(n).astype(np.float32)}
        table = pa.table(cols)
        nbytes += table.nbytes
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=65_536)
    writer.close()
    return nbytes


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak memory from /proc")
def test_a_million_rows_stream_with_bounded_memory(tmp_path):
    path = tmp_path / "rows.parquet"
    table_bytes = write_million_rows(path)
    assert pq.ParquetFile(path).metadata.num_rows == 1_000_000
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", MILLION, str(path)], capture_output=True, text=True, check=True,
        env={**__import__("os").environ, **env}, timeout=600,
    )  # fmt: skip
    got = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"1M rows: {got['seconds']:.1f} s, peak RSS growth {got['rss_growth'] / 2**20:.0f} MiB, "
          f"table in memory {table_bytes / 2**20:.0f} MiB")  # fmt: skip
    assert got["cells"] == 4 * 5 * (1 + 2 + 4 + 8) and got["n"] == 250_000
    # Bounded: the Parquet reader's buffers (one row group of the needed columns) and ~16 MB of bootstrap
    # weights per slice; the rows themselves are never held.
    assert got["rss_growth"] < min(0.35 * table_bytes, 200 * 2**20)
