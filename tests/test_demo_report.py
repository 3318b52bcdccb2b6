"""The demo report from plain data: the error to the true counterfactual split by the attribute's region,
beside the decoder floor, a legend that does not promise what no edit can reach, and what the off-target
check covers."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from prism_ray.phantom.truth import region_errors
from prism_ray.report.demo_report import (
    off_target_scope,
    render_demo_report,
    truth_key,
    truth_scores,
    truth_sentence,
)


def _case(seed: int):
    """A 16 px source whose region (a 4 x 4 square) holds a 'device' the true counterfactual removes; the
    edit removes it but, like a VAE, brightens everything else by 10 grey levels."""
    rng = np.random.default_rng(seed)
    source = rng.integers(60, 120, size=(16, 16)).astype(np.uint8)
    region = np.zeros((16, 16), bool)
    region[4:8, 4:8] = True
    true_cf = source.copy()
    source[region] = 250  # the device
    cf = np.where(region, true_cf, true_cf + 10).astype(np.uint8)
    return source, cf, true_cf, region, (source + 10).astype(np.uint8), (true_cf + 10).astype(np.uint8)


def test_truth_scores_split_the_error_by_region_beside_the_decoder_floor():
    src, cfs, trues, regions, src_vae, true_vae = map(list, zip(*(_case(s) for s in range(3)), strict=True))
    scores = truth_scores(src, cfs, trues, regions, src_vae, true_vae)
    ten = 10 / 255
    # The edit is exact inside the region; outside, it changed only what the round trip changes.
    assert scores[truth_key("edit", "inside")] == pytest.approx(0.0)
    assert scores[truth_key("edit", "outside")] == pytest.approx(ten)
    assert scores[truth_key("floor", "whole")] == pytest.approx(scores[truth_key("floor", "outside")])
    assert scores[truth_key("floor", "outside")] == pytest.approx(ten)
    # No edit pays no round trip: 0 outside, the whole device inside; over the whole image it "wins".
    assert scores[truth_key("no_edit", "outside")] == 0.0
    assert scores[truth_key("no_edit", "inside")] > 0.5
    assert scores[truth_key("vae_no_edit", "outside")] == pytest.approx(ten)
    assert scores["error_to_true_cf"] == pytest.approx(ten * 240 / 256)
    assert scores["decoder_floor_outside_region"] == scores[truth_key("floor", "outside")]
    # Pooled over pixels, as bench_phantom pools its region errors.
    by_region = region_errors(cfs, trues, regions)
    assert by_region.inside.tolist() == [0.0] * 3 and by_region.outside == pytest.approx([ten] * 3)

    sentence = truth_sentence({"subgroup": "remove_devices", "intervention": "Support Devices=false", **scores})
    assert "closer to the truth" in sentence and "round trip alone accounts for 0.039 (100%)" in sentence


def _table(page: str, id: str) -> list[dict[str, str]]:
    table = re.search(rf'<table id="{id}">(.*?)</table>', page, re.DOTALL).group(1)
    head = [html.unescape(h) for h in re.findall(r"<th(?: [^>]*)?>(.*?)</th>", table)]
    body = re.search(r"<tbody>(.*?)</tbody>", table, re.DOTALL).group(1)
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]
    return [dict(zip(head, map(html.unescape, cells), strict=True)) for cells in rows]


def test_the_report_shows_the_floor_and_says_what_off_target_covers(tmp_path):
    cases = [_case(s) for s in range(2)]
    src, cfs, trues, regions, src_vae, true_vae = map(list, zip(*cases, strict=True))
    entry = {
        "subgroup": "remove_devices", "intervention": "Support Devices=false", "scored": "accepted",
        "attempted": 2, "accepted": 2, "mean_s_clip": 0.2, "off_target_accepted": 0, "off_target_rejected": 1,
        "off_target_heads": "pacemaker ×1", "mean_reconstruction_error": 0.01,
        **truth_scores(src, cfs, trues, regions, src_vae, true_vae),
    }  # fmt: skip
    scope = off_target_scope("tiny", ["cardiomegaly", "pacemaker"], 64, 0.3)
    grid = [(f"accepted · example {k}", s, c, t, m) for k, (s, c, t, m, _, _) in enumerate(cases)]
    path = render_demo_report(
        str(tmp_path / "report.html"), run_info={"data": "phantoms"}, stats=[entry],
        grids=[("remove_devices", "Support Devices=false", grid)], off_target_scope=scope,
        augment_report="counterfactuals/report.html",
    )  # fmt: skip
    page = open(path).read()
    rows = {r["compared with the truth"]: r for r in _table(page, "truth-table")}
    assert set(rows) == {"counterfactual", "no edit (the source)", "no edit, through the VAE",
                         "decoder floor (true cf through the VAE)"}  # fmt: skip
    floor = rows["decoder floor (true cf through the VAE)"]
    assert float(floor["whole image"]) == pytest.approx(entry["decoder_floor"], abs=1e-3)
    assert float(rows["counterfactual"]["inside the region"]) == 0.0
    # The legend no longer promises that an edit beats the unedited source over the whole image.
    assert "an edit helps when its error is below this" not in page
    assert "most of an edit" in page and "round trip" in page
    # "0 off-target flips" is said to be a classifier's decisions, not a pixel comparison.
    assert 'id="off-target-scope"' in page and "64-px attribute classifier" in page
    assert "does not compare pixels" in html.unescape(page)
    # The grids show the difference outside the region as its own column.
    assert "outside the region" in page and page.count('id="grid-0"') == 1
    assert "remove_devices (Support Devices=false): inside the attribute" in html.unescape(page)
    assert off_target_scope(None, None, None, 0.3).startswith("The off-target filter was off")
