"""The README's main command, shrunk: phantoms -> Ray Train + DeepSpeed fine-tune -> Ray
actor counterfactuals with the demo's edit settings -> HTML report against the true counterfactuals."""

from __future__ import annotations

import html
import json
import os
import re

import pytest

from prism_ray import cli
from prism_ray.data.storage import read_table
from prism_ray.engine.settings import InversionConfig
from prism_ray.pipelines.demo import SUBGROUPS, DemoConfig
from prism_ray.pipelines.demo import run as run_demo


def _table(page: str, id: str) -> list[dict[str, str]]:
    """The table with this id as one dict per body row: header -> cell text."""
    table = re.search(rf'<table id="{id}">(.*?)</table>', page, re.DOTALL).group(1)
    head = [html.unescape(h) for h in re.findall(r"<th(?: [^>]*)?>(.*?)</th>", table)]
    body = re.search(r"<tbody>(.*?)</tbody>", table, re.DOTALL).group(1)
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]
    return [dict(zip(head, map(html.unescape, cells), strict=True)) for cells in rows]


@pytest.mark.slow
def test_demo_end_to_end(ray_local, tmp_path):
    config = DemoConfig(
        out=str(tmp_path / "demo"),
        n_subjects=60,  # enough sources for a quota of 1 once the off-target filter rejects some edits
        finetune_steps=2,
        quota=1,
        inversion=InversionConfig(num_inference_steps=8, num_inner_steps=2),
    )
    assert config.filter.off_target.classifier == "tiny"  # the demo's default: off-target edits are rejected
    report = run_demo(config, runner=cli.load_runner(cli.JOBS["demo"]))  # Ray Train + Ray actors, as the CLI
    stats = {s["subgroup"]: s for s in json.loads((report / "summary.json").read_text())}
    assert set(stats) == {name for name, _, _ in SUBGROUPS}
    for s in stats.values():
        assert s["attempted"] >= 1 and 0.0 < s["l1_to_source"] < 0.5
        assert "target_cpg" in s  # the shipped classifier scored them
        assert 0.0 < s["mean_reconstruction_error"] < 1.0
        assert s["off_target_accepted"] == 0  # measured (not None) and none let through
        # Beside the edit's error: the decoder floor and the split by region (outside it the truth is the source).
        assert 0.0 < s["decoder_floor"] < 0.5 and s["no_edit_error_to_true_cf_outside_region"] == 0.0
        assert s["error_to_true_cf_in_region"] > 0.0 and s["error_to_true_cf_outside_region"] > 0.0
    summary = json.loads((report / "augment_summary.json").read_text())
    assert summary  # the augment job's own summary is kept beside the report

    # Every finished edit was scored by the classifier; none accepted has an off-target flip.
    rows = read_table(str(tmp_path / "demo" / "counterfactuals" / "manifest.parquet")).to_pylist()
    assert rows and all(r["off_target"] is not None for r in rows)
    assert not [r for r in rows if r["accepted"] and r["off_target"] > 0]
    # One scope for the table's counts: the quota set (attempted = accepted + rejected there).
    flips = {g: sum(r["off_target"] > 0 for r in rows if r["subgroup"] == g and r["quota_status"] == "in_quota")
             for g in stats}  # fmt: skip

    # The HTML report's off-target columns say the same, each column explained in a sentence.
    page = (report / "report.html").read_text()
    table = {row["subgroup"]: row for row in _table(page, "demo-table")}
    assert set(table) == set(stats)
    for name, row in table.items():
        assert row["off-target flips, accepted"] == "0"
        assert int(row["off-target flips, rejected"]) == flips[name]
        assert flips[name] <= stats[name]["attempted"] - stats[name]["accepted"]
        assert float(row["S_CLIP"]) == pytest.approx(stats[name]["mean_s_clip"], abs=1e-3)
    assert "<b>off-target flips, accepted</b>: Accepted edits in which a classifier head" in page
    assert (tmp_path / "demo" / "counterfactuals" / "report.html").exists()  # the augment job's own report

    # It opens from disk in a real browser: no console errors, every picture decodes.
    from browser import find_chromium, open_page

    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Chromium not found; CI=true requires it (.ci/run installs it)")
        pytest.skip("Chromium not found (apt-get install chromium, or set PRISM_RAY_CHROMIUM)")
    demo_page, augment_page = (
        open_page(path, chromium)
        for path in (report / "report.html", report.parent / "counterfactuals" / "report.html")
    )
    for opened in (demo_page, augment_page):
        assert opened.console_errors == []
        assert opened.images and all(im["complete"] and im["naturalWidth"] > 0 for im in opened.images)
    assert {"run-info", "demo-table", "truth-table", "off-target-scope", "grid-0", "grid-1"} <= set(demo_page.ids)
    assert {"subgroup-table", "filter-table", "off-target-table"} <= set(augment_page.ids)
