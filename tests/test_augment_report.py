"""The augment job's report.html: counts, filter reasons and off-target flips from the manifest, a bounded
seeded sample of example grids, moved sources skipped, and the page opened in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_augment_pipeline import FakeEngine, make_config, run

from prism_ray.data.schemas import COUNTERFACTUAL_SCHEMA, rows_to_table
from prism_ray.data.storage import read_table, write_table
from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
from prism_ray.report.augment_report import rejection_reasons, write_augment_report
from prism_ray.results.layout import Layout


class OffTargetEngine(FakeEngine):
    """The fake engine plus classifier verdicts: every third attempt rank moves the cardiomegaly head."""

    def counterfactuals(self, pixels, tasks):
        out, errors = super().counterfactuals(pixels, tasks)
        for item in out:
            ranks = [e["rank"] for e in tasks[item.index]["edits"]]
            item.scores["off_target"] = np.array([1.0 if r % 3 == 1 else 0.0 for r in ranks])
            item.scores["off_target_heads"] = np.array(
                ["cardiomegaly" if r % 3 == 1 else "" for r in ranks], object
            )
        return out, errors


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("report-data"))
    return write_phantom_dataset(
        root, PhantomDatasetConfig(n_subjects=60, resolution=32, seed=4)
    ).manifest_uri


@pytest.fixture(scope="module")
def finished(manifest, tmp_path_factory):
    """One augment run with the off-target filter on (the fake engine's verdicts): (config, summary, rows)."""
    out = tmp_path_factory.mktemp("report-run") / "out"
    config = make_config(manifest, out, quota=3, filter={"off_target": {"classifier": "tiny"}})
    summary = run(config, engine=OffTargetEngine())
    return config, summary, read_table(Layout.of(str(out)).manifest).to_pylist()


def _images(page: str) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def _table(page: str, id: str) -> list[list[str]]:
    """The body cells of the table with this id, as text."""
    body = re.search(rf'<table id="{id}">.*?<tbody>(.*?)</tbody>', page, re.DOTALL).group(1)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_every_run_writes_a_report_with_counts_reasons_and_off_target_flips(finished):
    _, summary, rows = finished
    page = (Path(summary["output"]) / "report.html").read_text()
    quota_set = [r for r in rows if r["quota_status"] == "in_quota"]
    subgroups = {row[0]: row for row in _table(page, "subgroup-table")}
    reasons = {row[0]: row for row in _table(page, "filter-table")}
    off = {row[0]: row for row in _table(page, "off-target-table")}
    for name in ("effusion", "devices"):
        mine = [r for r in quota_set if r["subgroup"] == name]
        rejected = [r for r in mine if not r["accepted"]]
        assert subgroups[name][2:5] == ["3", "3", str(len(rejected))]  # quota, accepted, rejected
        # The fake engine: odd ranks fail S_CLIP, ranks 1, 4, 7... are off-target (some fail both).
        by_clip = sum(r["attempt_rank"] % 2 == 1 for r in rejected)
        by_target = sum(r["attempt_rank"] % 3 == 1 for r in rejected)
        assert reasons[name] == [name, str(len(rejected)), str(by_clip), str(by_target)]
        # Off-target flips are counted over every finished attempt, beyond the quota too.
        finished = [r for r in rows if r["subgroup"] == name]
        flips = sum(r["attempt_rank"] % 3 == 1 for r in finished)
        assert by_target > 0 and off[name][1:4] == [str(len(finished)), str(flips), "0"]
        assert off[name][4] == f"cardiomegaly ×{flips}"
        assert not any(r["accepted"] and r["off_target"] for r in finished)  # the filter let none through
    assert "S_CLIP &lt; 0.1" in page and "off-target" in page
    # Each grid row: source | counterfactual | signed difference; accepted and rejected grids per subgroup.
    images = _images(page)
    assert len(images) == 3 * sum(
        min(3, 6) + min(len([r for r in quota_set if r["subgroup"] == n and not r["accepted"]]), 3)
        for n in ("effusion", "devices")
    )
    assert all(im.shape[:2] == (16, 16) for im in images)  # sources resized to the counterfactual
    assert "rejected: S_CLIP &lt; 0.1" in page


def test_rejection_reasons_name_every_failed_threshold(finished):
    config = finished[0]
    ok = {"s_clip": 0.5, "off_target": 0.0}
    assert rejection_reasons(config.filter, ok) == []
    assert rejection_reasons(config.filter, {"s_clip": float("nan"), "off_target": 2.0}) == [
        "S_CLIP < 0.1",
        "off-target",
    ]
    strict = config.filter.model_copy(update={"reconstruction_psnr_min": 25.0})
    assert rejection_reasons(strict, dict(ok, reconstruction_psnr=21.0)) == ["fidelity PSNR < 25 dB"]
    seeing = config.filter.model_copy(update={"off_target": config.filter.off_target.model_copy(
        update={"require_target": True})})
    assert rejection_reasons(seeing, dict(ok, on_target=1.0)) == []
    assert rejection_reasons(seeing, dict(ok, on_target=0.0)) == ["target not seen"]


def test_a_large_run_gives_a_small_report_and_moved_sources_are_skipped(finished, tmp_path, caplog):
    """2 x 2,600 rows in the quota sets (the fake run's rows repeated): the report shows a seeded sample of
    each subgroup; the sources of one subgroup are gone: skipped with a warning, the report is still written."""
    config, summary, rows = finished
    out = tmp_path / "big"
    effusion = next(r for r in rows if r["subgroup"] == "effusion")
    devices = dict(next(r for r in rows if r["subgroup"] == "devices"), source_uri=str(tmp_path / "gone.png"))
    big = [
        dict(r, cf_id=f"{r['cf_id']}-{k}", accepted=k < 2500, quota_status="in_quota")
        for k in range(2600)
        for r in (effusion, devices)
    ]
    write_table(rows_to_table(big, COUNTERFACTUAL_SCHEMA), str(out / "manifest.parquet"))
    big_summary = dict(summary, output=str(out))
    with caplog.at_level("WARNING", logger="prism_ray.augment"):
        uri = write_augment_report(config, big_summary)
    page = Path(uri).read_text()
    assert len(page) < 200_000
    assert len(_images(page)) == 3 * (6 + 3)  # effusion: 6 accepted + 3 rejected rows
    assert len([m for m in caplog.messages if "skipped" in m]) == 6 + 3  # every devices example


def test_the_report_opens_in_chromium_without_errors(finished, tmp_path):
    from browser import find_chromium, open_page

    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Chromium not found; CI=true requires it (.ci/run installs it)")
        pytest.skip("Chromium not found (apt-get install chromium, or set PRISM_RAY_CHROMIUM)")
    page = open_page(Path(finished[1]["output"]) / "report.html", chromium)
    assert page.console_errors == []
    assert page.images and all(im["complete"] and im["naturalWidth"] > 0 for im in page.images)
    assert {"run-info", "subgroup-table", "filter-table", "off-target-table", "grid-0"} <= set(page.ids)
    assert page.width <= 1280
