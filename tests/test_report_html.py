"""The self-contained HTML report: escaping, inline images, audit figures and sentences, and the rendered
audit report opened from disk in a real headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from prism_ray.phantom.render import PhantomAttributes, render_phantom, true_counterfactual
from prism_ray.report.audit_report import flagged_sentences, format_q, render_audit_report
from prism_ray.report.grids import Example
from prism_ray.report.html import HtmlReport
from prism_ray.report.plots import cochange_heatmap, signed_difference_map, subgroup_bars
from prism_ray.report.run_report import render_run_report

INTERVENTIONS = ["do(Cardiomegaly=0)", "do(sex=flip)", "do(age=+20)"]
ATTRIBUTES = ["cardiomegaly", "pacemaker", "effusion", "sex"]
FLAGGED = {
    ("do(Cardiomegaly=0)", "pacemaker"): (0.41, 0.02, 1e-9),
    ("do(age=+20)", "effusion"): (0.30, 0.05, 3e-4),
}
EXPECTED = {("do(Cardiomegaly=0)", "cardiomegaly"), ("do(sex=flip)", "sex")}


def _cochange(with_direction: bool = False) -> pa.Table:
    """A hand-made co-change table: two flagged cells, two targets, the rest drift alone."""
    rows = []
    for intervention in INTERVENTIONS:
        for attribute in ATTRIBUTES:
            for subgroup, n in (("all", 240), ("sex=female", 118), ("sex=male", 122)):
                cell = (intervention, attribute)
                change, control, q = FLAGGED.get(cell, (0.85 if cell in EXPECTED else 0.06, 0.04, 0.7))
                row = {
                    "intervention": intervention, "attribute": attribute, "subgroup": subgroup, "n": n,
                    "change_rate": change, "control_rate": control, "difference": change - control,
                    "ci_low": change - control - 0.07, "ci_high": change - control + 0.07,
                    "p_value": q / 10, "q_value": q if subgroup == "all" else min(1.0, q * 3),
                    "expected": cell in EXPECTED, "flagged": cell in FLAGGED and subgroup == "all",
                }  # fmt: skip
                if with_direction:
                    row["mean_signed_delta_p"] = -0.31 if cell in FLAGGED else 0.01
                rows.append(row)
    return pa.Table.from_pylist(rows)


def _examples(n: int) -> list[Example]:
    """Phantoms with cardiomegaly and a pacemaker, and their true do(cardiomegaly=0, pacemaker off) images."""
    attrs = PhantomAttributes(cardiomegaly=True, devices=frozenset({"pacemaker"}), sex="female", age=70)
    return [
        Example(
            render_phantom(attrs, seed),
            true_counterfactual(attrs, seed, {"cardiomegaly": False, "pacemaker": False}),
            f"phantom {seed}: P(pacemaker) 0.93 → 0.08",
        )
        for seed in range(n)
    ]


def _data_uri_images(page: str) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


# --- the document builder ----------------------------------------------------------------------


def test_every_text_is_escaped():
    evil = '<script>alert("x")</script> & "q"'
    report = HtmlReport(evil)
    report.add_heading(evil)
    report.add_paragraph(evil)
    report.add_key_values({evil: evil, "list": [evil]})
    report.add_table(columns=[evil], rows=[[evil]], caption=evil, explanations={evil: evil})
    report.add_image(np.zeros((8, 8), np.uint8), caption=evil)
    report.add_image_grid([(evil, [np.zeros((8, 8), np.uint8)])], [evil], column_explanations=[evil])
    page = report.to_html()
    assert "<script>" not in page and 'alert("x")' not in page
    assert page.count("&lt;script&gt;") >= 10


def test_images_are_embedded_losslessly_downscaled_and_capped():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    report = HtmlReport("images", max_images=3, max_image_side=64)
    report.add_image(gray, caption="gray")
    report.add_image(rgb, caption="rgb", display_width=64)
    report.add_image(np.zeros((100, 300), np.uint8), caption="big")  # downscaled to 64 x 21
    report.add_image(gray, caption="over the cap")
    page = report.to_html()

    decoded = _data_uri_images(page)
    assert len(decoded) == 3
    np.testing.assert_array_equal(decoded[0], gray)
    np.testing.assert_array_equal(decoded[1], rgb)
    assert decoded[2].shape == (21, 64)
    assert 'width="64" height="64" class="pixel"' in page  # small image shown enlarged with sharp pixels
    assert report.images_embedded == 3 and report.images_omitted == 1
    assert "image limit reached" in page and "1 more not embedded (limits: max_images=3," in page

    by_bytes = HtmlReport("bytes", max_bytes=1500)
    for _ in range(3):
        by_bytes.add_image(gray)  # ~800 bytes of PNG each (random pixels do not compress)
    assert (by_bytes.images_embedded, by_bytes.images_omitted) == (1, 2) and by_bytes.bytes_embedded <= 1500


def test_tables_from_arrow_with_explanations_and_row_limit():
    table = pa.table({"subgroup": ["a", "b", "c"], "n": [1200, 3, 4], "rate": [0.5, 0.25, float("nan")]})
    report = HtmlReport("t")
    report.add_table(table, caption="cap", explanations={"rate": "Share accepted."}, id="t1", max_rows=2)
    page = report.to_html()
    assert '<table id="t1">' in page and '<th title="Share accepted.">rate</th>' in page
    assert '<td class="num">1,200</td>' in page and '<td class="num">0.250</td>' in page
    assert ">c<" not in page and "Showing the first 2 of 3 rows." in page
    with pytest.raises(ValueError, match="unknown column"):
        report.add_table(table, explanations={"nope": "x"})


def test_write_switches_the_file_into_place_locally_and_on_fsspec(tmp_path):
    report = HtmlReport("written")
    report.add_paragraph("hello")
    target = tmp_path / "out" / "report.html"
    assert report.write(str(target)) == str(target)
    assert "<p>hello</p>" in target.read_text() and os.listdir(target.parent) == ["report.html"]

    import fsspec

    report.write("memory://prism-report-test/report.html")
    with fsspec.open("memory://prism-report-test/report.html", "r") as f:
        assert "<title>written</title>" in f.read()


# --- audit figures and words ---------------------------------------------------------------------


def test_heatmap_marks_exactly_the_flagged_cells():
    fig = cochange_heatmap(_cochange())
    ax = fig.axes[0]
    outlined = {
        (round(p.get_y() + 0.46), round(p.get_x() + 0.46)): p.get_gid() for p in ax.patches if p.get_gid()
    }  # (row, column) -> 'flagged' / 'expected'
    starred = {
        (round(t.get_position()[1]), round(t.get_position()[0]))
        for t in ax.texts
        if t.get_text().endswith("*")
    }
    cell = {(INTERVENTIONS.index(i), ATTRIBUTES.index(a)) for i, a in FLAGGED}
    assert starred == cell
    assert {k for k, v in outlined.items() if v == "flagged"} == cell
    assert {k for k, v in outlined.items() if v == "expected"} == {
        (INTERVENTIONS.index(i), ATTRIBUTES.index(a)) for i, a in EXPECTED
    }
    pacemaker = next(t for t in ax.texts if t.get_text().endswith("*") and t.get_position() == (1, 0))
    assert pacemaker.get_text() == "+0.39*"
    values = ax.images[0].get_array()  # (I, A) differences
    assert values.shape == (3, 4) and values[0, 1] == pytest.approx(0.39)


def test_subgroup_bars_show_differences_with_their_intervals():
    fig = subgroup_bars(_cochange(), "do(Cardiomegaly=0)", "pacemaker")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([0.39, 0.39, 0.39])
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["all\nn=240", "sex=female\nn=118", "sex=male\nn=122"]
    from matplotlib.container import ErrorbarContainer

    errorbar = next(c for c in ax.containers if isinstance(c, ErrorbarContainer))
    caps = errorbar.lines[1]  # the CI caps: low and high ends
    assert sorted(float(y) for c in caps for y in c.get_ydata()) == pytest.approx([0.32] * 3 + [0.46] * 3)
    with pytest.raises(ValueError, match="no rows"):
        subgroup_bars(_cochange(), "do(nothing)", "pacemaker")


def test_signed_difference_map_colours_brighter_red_darker_blue_unchanged_white():
    original = np.full((4, 4), 100, np.uint8)
    counterfactual = original.copy()
    counterfactual[0, 0], counterfactual[3, 3] = 200, 0
    rgb = signed_difference_map(original, counterfactual)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    red, blue, white = rgb[0, 0].astype(int), rgb[3, 3].astype(int), rgb[1, 1].astype(int)
    assert red[0] > 100 > red[2] and blue[2] > 50 > blue[0]
    assert (white > 235).all()
    half = signed_difference_map(original, counterfactual, scale=200)[0, 0].astype(int)
    assert half[0] > half[2] and half[2] > red[2]  # a larger scale saturates less: paler red
    with pytest.raises(ValueError, match="shapes differ"):
        signed_difference_map(original, np.zeros((5, 5), np.uint8))


def test_flagged_sentences_rank_and_word_the_flagged_cells():
    pacemaker = (
        "do(Cardiomegaly=0) also flipped the pacemaker decision in 41 % of 240 images vs 2 % in the control "
        "(+39 points, 95 % CI +32 to +46), q = 1e-9."
    )
    effusion = (
        "do(age=+20) also flipped the effusion decision in 30 % of 240 images vs 5 % in the control "
        "(+25 points, 95 % CI +18 to +32), q = 3e-4."
    )
    assert flagged_sentences(_cochange()) == [pacemaker, effusion]
    directed = flagged_sentences(_cochange(with_direction=True))[0]
    assert "vs 2 % in the control and lowered its probability by 0.31 on average (+39 points" in directed
    assert [format_q(q) for q in (0.04, 0.0012, 1e-9, 2.5e-12, float("nan"))] == [
        "0.04",
        "0.0012",
        "1e-9",
        "2.5e-12",
        "n/a",
    ]


def test_an_underpowered_audit_says_what_it_could_not_flag(tmp_path):
    # An audit of 11 images per intervention (the README's do(Cardiomegaly=0)), 60 tests: nothing flagged, and
    # that must not read as "no co-change": the report says no cell could reach q < 0.01 (11/11 vs 0/11 gives
    # p = 2^-10, x 60 tests > 0.01) and lists the strongest unflagged co-changes with their CIs.
    from prism_ray.scoring.audit_stats import benjamini_hochberg, mcnemar_exact

    rows = []
    counts = {"cardiomegaly": (0, 0), "pacemaker": (7, 0), "effusion": (2, 1), "devices": (1, 0), "sex": (0, 0)}
    targets = {"Cardiomegaly=0": "cardiomegaly", "Cardiomegaly=1": "cardiomegaly", "Pleural Effusion=0": "effusion",
               "Support Devices=0": "devices"}  # fmt: skip
    for intervention, target in targets.items():
        for attribute, (edit_only, control_only) in {**counts, target: (11, 0)}.items():  # every target flips
            # "all" (11 images) and its two halves by a subgroup column (6 and 5 images).
            for subgroup, n, share in (("all", 11, 1.0), ("Sex=F", 6, 0.6), ("Sex=M", 5, 0.4)):
                b, c = round(edit_only * share), round(control_only * share)
                rows.append({
                    "intervention": intervention, "attribute": attribute, "subgroup": subgroup, "n": n,
                    "change_rate": b / n, "control_rate": c / n, "difference": (b - c) / n,
                    "ci_low": (b - c) / n - 0.2, "ci_high": (b - c) / n + 0.2, "p_value": mcnemar_exact(b, c),
                    "expected": attribute == target,
                })  # fmt: skip
    q = benjamini_hochberg([r["p_value"] for r in rows])
    table = pa.Table.from_pylist([{**r, "q_value": float(v), "flagged": False} for r, v in zip(rows, q, strict=True)])
    assert "min_q_value" not in table.column_names  # an older cochange.parquet: the report computes it
    path = render_audit_report(str(tmp_path / "report.html"), run_info={"images": 11}, cochange=table,
                               examples={}, alpha=0.01, min_effect=0.05)  # fmt: skip
    page = html.unescape(Path(path).read_text())
    assert "No co-change was flagged" in page
    power = re.search(r'<p id="power"[^>]*>(.*?)</p>', page, re.DOTALL).group(1)
    assert "48 of 48 cells that could be flagged (not expected) cannot reach q < 0.01 at any effect size" in power
    assert "not measurable with these images" in power
    assert "a cell needs at least 14 images" in power and "after the BH correction over 60 tests" in power
    unflagged = re.search(r'<table id="unflagged-table">(.*?)</table>', page, re.DOTALL).group(1)
    body = re.findall(r"<tr>(.*?)</tr>", re.search(r"<tbody>(.*?)</tbody>", unflagged, re.DOTALL).group(1))
    first = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", body[0])]
    # The strongest: 7/11 pacemaker flips, its CI, q and the best q 11 images allow, and the verdict.
    assert first[2] == "pacemaker" and first[8] == "+0.436 to +0.836" and first[-1] == "no: too few images"
    assert len(body) == 10  # the ten strongest of them
    assert float(first[10]) >= 0.01


def test_a_missing_cochange_column_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"cochange: missing column\(s\) \['q_value'\]"):
        flagged_sentences(_cochange().drop_columns(["q_value"]))


def test_run_report_has_counts_and_grids(tmp_path):
    subgroups = [{"subgroup": "sex=female", "attempted": 10, "accepted": 7, "acceptance": 0.7}]
    path = render_run_report(
        str(tmp_path / "run.html"), title="augment run", run_info={"model": "tiny", "errors": 0},
        subgroups=subgroups, examples={"sex=female · accepted": _examples(3)},
    )  # fmt: skip
    page = Path(path).read_text()
    assert 'id="subgroup-table"' in page and 'id="grid-0"' in page and ">source<" in page
    assert len(_data_uri_images(page)) == 9  # 3 rows × source | counterfactual | difference


# --- the audit report in a real browser -------------------------------------------------------------


def _chromium() -> str:
    from browser import find_chromium

    path = find_chromium()
    if path is None:
        reason = "Chromium not found (apt-get install chromium, or set PRISM_RAY_CHROMIUM)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI=true requires it (.ci/run installs it)")
        pytest.skip(f"{reason}; required when CI=true")
    return path


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PRISM_RAY_TEST_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_audit_report_opens_from_disk_in_chromium(tmp_path):
    from browser import open_page

    chromium = _chromium()
    report = tmp_path / "audit" / "report.html"
    render_audit_report(
        str(report),
        run_info={"model": "tiny demographic family (biased)", "manifest": "memory://held-out.parquet",
                  "interventions": INTERVENTIONS, "images": 240, "errors": 0, "blend": "none"},
        cochange=_cochange(with_direction=True),
        per_intervention=pa.table({"intervention": INTERVENTIONS, "target_cpg": [0.61, 0.55, 0.2]}),
        examples={"do(Cardiomegaly=0) → pacemaker: strongest": _examples(3), "do(sex=flip): random": _examples(2)},
        alpha=0.01, min_effect=0.05,
    )  # fmt: skip
    text = report.read_text()
    for sentence in flagged_sentences(_cochange(with_direction=True)):
        assert sentence in text
    page = open_page(report, chromium)

    shot = _artifacts(tmp_path) / "audit_report.png"
    shot.write_bytes(page.screenshot)
    print(f"audit report screenshot: {shot}")
    assert page.console_errors == []
    # heatmap + 4 bar charts (2 flagged, 2 targets) + (3 + 2) example rows × 3 columns
    assert len(page.images) == 1 + 4 + 15
    assert all(im["complete"] and im["naturalWidth"] > 0 for im in page.images), page.images
    assert {"cochange-heatmap", "flagged-table", "run-info", "grid-0", "grid-1", "cochange-table"} <= set(
        page.ids
    )
    assert page.title == "prism_ray audit report"
    assert page.width <= 1280  # nothing wider than the window: no sideways scrolling
    assert Image.open(io.BytesIO(page.screenshot)).size[1] > 1500  # the whole page, not one viewport


def test_the_browser_check_catches_broken_images_and_console_errors(tmp_path):
    """The negative control: the same checks on a page that is broken must fail."""
    from browser import open_page

    chromium = _chromium()
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="data:image/png;base64,AAAA" alt="bad"><img src="missing.png" alt="gone">'
        '<script>console.error("boom"); undefined_function();</script></body></html>'
    )
    page = open_page(broken, chromium)
    assert [im["naturalWidth"] for im in page.images] == [0, 0]
    assert any("boom" in e for e in page.console_errors)
    assert any("undefined_function" in e or "Uncaught" in e for e in page.console_errors)
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in page.console_errors), (
        page.console_errors
    )
