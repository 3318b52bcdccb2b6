"""The experiment report from hand-made per-seed scores: it opens with the pre-stated primary comparison and
a verdict, says what the seeds can resolve and that the other rows are exploratory, and its Markdown tables
keep their column count."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from prism_ray.config import build_config
from prism_ray.pipelines import experiment
from prism_ray.results.layout import Layout
from prism_ray.scoring.classification import head_metrics

HEADS = {"pleural_effusion": "Pleural Effusion", "support_devices": "Support Devices"}


def _config(tmp_path, **evaluation):
    return build_config(experiment.ExperimentConfig, {
        "data": {"manifest": "unused.parquet"}, "heads": HEADS, "counterfactuals": "cf", "samples": "samples",
        "evaluation": {"subgroups": ["Sex"], "n_boot": 20, "min_group": 1, **evaluation}, "output": str(tmp_path),
    })  # fmt: skip


def _arm_rows(config) -> list[dict]:
    """Per arm and seed, the metric rows of two heads on 80 test images; the counterfactual arm fixes the
    effusion head on 'device, no effusion' images in seeds 1 and 2 only (a difference 3 seeds cannot resolve)."""
    rng = np.random.default_rng(0)
    n = 80
    effusion, devices = rng.random(n) < 0.4, rng.random(n) < 0.4
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    y = np.stack([effusion, devices], axis=1).astype(float)
    rows = []
    for arm in experiment.ARMS:
        for seed in config.seeds:
            p = np.where(y > 0.5, 0.8, 0.2) + rng.normal(0, 0.05, size=y.shape)
            shortcut = devices & ~effusion & (rng.random(n) < 0.3)  # read "device" as "effusion"
            if arm == "counterfactuals" and seed > 0:
                shortcut &= rng.random(n) < 0.3
            p[shortcut, 0] = 0.7
            for h, head in enumerate(HEADS):
                groups = {"Sex": sex, **({"Support Devices": devices.astype(float)} if h == 0 else
                                         {"Pleural Effusion": effusion.astype(float)})}  # fmt: skip
                for row in head_metrics(y[:, h], p[:, h], groups, n_boot=20, min_group=1):
                    rows.append({"arm": arm, "seed": seed, "head": head, **row})
    return rows


def test_the_report_opens_with_the_primary_comparison_and_its_limits(tmp_path):
    config = _config(tmp_path)
    assert config.primary() == ("pleural_effusion", "Support Devices")  # the other head's column: the shortcut
    table = experiment.compare(_arm_rows(config), 0.95)
    summary = {"arms": {a: {} for a in experiment.ARMS}, "test_rows": 80}
    experiment.write_report(Layout.of(str(tmp_path)), summary, table, config)
    md = (tmp_path / "report.md").read_text()

    # The opening: the primary comparison, before any exploratory row, with a verdict.
    assert md.index("## Primary comparison") < md.index("## All rows (exploratory)") < md.index("### pleural_effusion")
    primary = experiment.primary_comparison(table, "pleural_effusion", "Support Devices")
    c = {x["arm"]: x for x in primary["comparisons"]}
    assert set(c) == {"counterfactuals", "sd_samples", "group_balanced", "group_dro"}
    cell = next(r for r in table if r["arm"] == "counterfactuals" and r["attribute"] == "Support Devices"
                and r["metric"] == "worst_group_accuracy" and r["head"] == "pleural_effusion")  # fmt: skip
    assert c["counterfactuals"]["diff"] == pytest.approx(cell["diff"])
    assert c["counterfactuals"]["resolved"] == (cell["diff_ci_low"] > 0 or cell["diff_ci_high"] < 0)
    opening = md[md.index("## Primary comparison"):md.index("## All rows")]
    assert "| (c) − (a) |" in opening and "| (b) − (a) |" in opening
    assert "worst-group accuracy of `pleural_effusion`" in opening and "`Support Devices`" in opening
    verdict = "`counterfactuals` above `original`" if c["counterfactuals"]["resolved"] else "not resolved"
    assert re.search(r"\*\*\(c\) − \(a\) = [+-]\d\.\d{3}: " + re.escape(verdict), opening)
    # What 3 seeds can resolve, and the multiplicity of the rest.
    assert "2 degrees of freedom" in opening and "± 4.30 × sd / √3" in opening
    assert "cannot go below p = 0.250 with 3 seeds" in opening and "needs 6 seeds" in opening
    tests = experiment.exploratory_tests(table, primary, 0.05)
    assert f"Its tables hold {tests['tests']} paired t-tests" in opening and tests["tests"] > 50
    assert "is not evidence that an arm helped" in opening

    # Every Markdown table row has as many cells as its header (subgroup rows used to split on a '|').
    for block in re.findall(r"((?:^\|.*\|$\n?)+)", md, re.MULTILINE):
        lines = block.strip().splitlines()
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in lines}
        assert len(widths) == 1, lines[:3]
    assert "accuracy given pleural_effusion=1, Support Devices=0.0" in md or "Support Devices=0" in md

    html = (tmp_path / "report.html").read_text()
    assert 'id="primary-table"' in html and 'id="verdict"' in html
    assert html.index('id="primary"') < html.index('id="exploratory"')
    json.dumps(primary)  # plain data: it goes into summary.json as it is


def test_the_primary_comparison_is_checked_in_the_config(tmp_path):
    with pytest.raises(Exception, match="primary_head: 'nope' is not one of the heads"):
        _config(tmp_path, primary_head="nope")
    with pytest.raises(Exception, match="primary_attribute: 'Age' is not scored"):
        _config(tmp_path, primary_attribute="Age")
    assert _config(tmp_path, primary_head="support_devices").primary() == ("support_devices", "Pleural Effusion")
    assert _config(tmp_path, primary_attribute="Sex").primary() == ("pleural_effusion", "Sex")
    missing = experiment.primary_comparison([], "pleural_effusion", "Sex")
    assert "no worst-group accuracy" in missing["missing"] and missing["comparisons"] == []


def test_a_worst_group_accuracy_of_zero_is_a_result_not_missing():
    """A classifier that takes the shortcut completely scores 0 in a contradicting group: still a comparison."""
    from prism_ray.pipelines import experiment

    key = {"head": "pleural_effusion", "attribute": "Support Devices", "group": "worst",
           "metric": "worst_group_accuracy"}
    table = [dict(key, arm="original", mean=0.0, ci_low=0.0, ci_high=0.0, n_seeds=5),
             dict(key, arm="counterfactuals", mean=0.4, ci_low=0.3, ci_high=0.5, n_seeds=5, diff=0.4,
                  diff_ci_low=0.3, diff_ci_high=0.5, p_paired_t=0.001, p_sign_flip=0.06)]
    primary = experiment.primary_comparison(table, "pleural_effusion", "Support Devices")
    assert "missing" not in primary and primary["arms"]["original"]["mean"] == 0.0
    assert [(c["arm"], c["label"], c["resolved"]) for c in primary["comparisons"]] == [
        ("counterfactuals", "(c) − (a)", True)]
