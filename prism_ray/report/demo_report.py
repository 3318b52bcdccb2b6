"""The demo's HTML report: its counterfactuals scored against the phantoms' true counterfactuals, off-target
flips per subgroup, and example grids source | counterfactual | true counterfactual | signed difference."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

# summary.json key -> (table header, what the column means in a sentence).
COLUMNS = {
    "subgroup": ("subgroup", None),
    "attempted": ("attempted", "Edits in the subgroup's quota set (accepted and rejected by the filter)."),
    "accepted": ("accepted", "Edits the filter accepted: S_CLIP and, with a classifier, no off-target flip."),
    "mean_s_clip": (
        "S_CLIP",
        (
            "Mean CLIP directional score of the scored edits: how far the edit moved the image the way the caption "
            "moved (PRISM keeps S_CLIP ≥ 0.1)."
        ),
    ),
    "error_to_true_cf": (
        "error to true cf",
        (
            "Mean absolute pixel error (on [0, 1]) between the counterfactual and the true counterfactual: the "
            "same phantom re-rendered with only the intervened attribute changed."
        ),
    ),
    "no_edit_error_to_true_cf": (
        "no-edit error to true cf",
        (
            "The same error for the unedited source (the 'no edit' baseline): an edit helps when its error is "
            "below this."
        ),
    ),
    "target_flip_rate": (
        "target flip rate",
        (
            "Share of scored edits where the classifier head of the intervened attribute changed its decision "
            "(p crossed 0.5): the edit did what it was asked."
        ),
    ),
    "target_cpg": (
        "target CPG",
        "Mean |Δp| of that head between source and counterfactual (the papers' CPG).",
    ),
    "off_target_accepted": (
        "off-target flips, accepted",
        (
            "Accepted edits in which a classifier head the intervention should not change flipped its decision (or "
            "moved more than filter.off_target.max_shift), counted from the manifest's off_target column over every "
            "finished attempt: 0 while the off-target filter is on; empty when it is off (not measured)."
        ),
    ),
    "off_target_rejected": (
        "off-target flips, rejected",
        "Finished attempts with such a flip, which the off-target filter rejected.",
    ),
    "off_target_heads": (
        "off-target heads",
        "Which heads flipped in those attempts, and how often (manifest column off_target_heads).",
    ),
    "mean_reconstruction_error": (
        "reconstruction error",
        "How well the sources inverted: relative squared latent error of the unedited reconstruction.",
    ),
}


def write_demo_report(
    out: Path,
    counterfactuals: str,
    ground_truth_uri: str,
    model_root: str,
    *,
    filter_config,
    run_info: dict[str, Any],
    accepted_examples: int = 4,
    rejected_examples: int = 2,
) -> Path:
    """Write `out/report/report.html` and `summary.json` (one entry per subgroup) and return the folder.

    `model_root` is the family whose shipped classifier (if any) scores the target head;
    `filter_config` the augment job's filter (the reasons shown beside rejected examples).
    """
    from prism_ray.data.storage import join_uri, read_image, read_table
    from prism_ray.models.loading import resolve_model_root
    from prism_ray.phantom.truth import TARGET_HEAD, classifier_path, gray, score_against_truth, true_cf_for
    from prism_ray.report.augment_report import rejection_reasons
    from prism_ray.report.html import HtmlReport

    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    finished = [
        r
        for r in read_table(join_uri(counterfactuals, "manifest.parquet")).to_pylist()
        if r.get("quota_status") in (None, "in_quota", "beyond_quota") and r.get("image_uri")
    ]
    # The quota sets are scored; off-target flips are counted over every finished attempt (beyond quota too).
    manifest = [r for r in finished if r.get("quota_status") in (None, "in_quota")]
    truth = {r["image_uri"]: r for r in read_table(ground_truth_uri).to_pylist()}
    classifier = classifier_path(resolve_model_root(model_root))
    clf = heads = None
    if classifier is not None:
        from prism_ray.models.classifier import classifier_labels, load_classifier, predict_proba

        clf = load_classifier(classifier)
        heads = classifier_labels(clf)

    stats, grids = [], []
    for subgroup in sorted({r["subgroup"] for r in manifest}):
        attempted = [r for r in manifest if r["subgroup"] == subgroup]
        accepted = [r for r in attempted if r["accepted"]]
        rows, scope = (accepted, "accepted") if accepted else (attempted, "rejected (none accepted)")
        # Rejected examples from every finished attempt, off-target ones first: they show what the filter caught.
        rejected = [r for r in finished if r["subgroup"] == subgroup and not r["accepted"]]
        rejected.sort(key=lambda r: not (r.get("off_target") or 0) > 0)
        shown = accepted[:accepted_examples] + rejected[:rejected_examples]
        images = {r["cf_id"]: (read_image(r["source_uri"]), read_image(r["image_uri"])) for r in rows + shown}
        src = [images[r["cf_id"]][0] for r in rows]
        cfs = [images[r["cf_id"]][1] for r in rows]
        resolution = src[0].shape[0]
        trues = [true_cf_for(truth[r["source_uri"]], r["intervention"], resolution) for r in rows]
        scores = score_against_truth(src, cfs, trues)
        entry = {
            "subgroup": subgroup,
            "intervention": rows[0]["intervention"],
            "scored": scope,
            "attempted": len(attempted),
            "accepted": len(accepted),
            "mean_s_clip": float(np.mean([r["s_clip"] for r in rows])),
            "mean_reconstruction_error": float(np.mean([r["reconstruction_error"] for r in rows])),
            "l1_to_source": float(scores.l1_to_source.mean()),
            "error_to_true_cf": float(scores.error_to_true.mean()),
            "no_edit_error_to_true_cf": float(scores.source_to_true.mean()),
            **_off_target([r for r in finished if r["subgroup"] == subgroup]),
        }
        target = {}
        if clf is not None:
            head = TARGET_HEAD.get(rows[0]["intervention"].split("=")[0])
            if head in heads:
                k = heads.index(head)
                p_src = predict_proba(clf, np.stack([gray(x) for x in src]))[:, k]
                p_cf = predict_proba(clf, np.stack([gray(x) for x in cfs]))[:, k]
                entry["target_cpg"] = float(np.abs(p_cf - p_src).mean())
                entry["target_flip_rate"] = float(((p_cf >= 0.5) != (p_src >= 0.5)).mean())
                target = {r["cf_id"]: (head, a, b) for r, a, b in zip(rows, p_src, p_cf)}
        stats.append(entry)
        grid = []
        for r in shown:
            source, cf = images[r["cf_id"]]
            why = (
                "accepted" if r["accepted"] else "rejected: " + ", ".join(rejection_reasons(filter_config, r))
            )
            words = [why, r["source_uri"].rsplit("/", 1)[-1], f"S_CLIP {r['s_clip']:.2f}"]
            if r["cf_id"] in target:
                head, a, b = target[r["cf_id"]]
                words.append(f"{head} p {a:.2f}→{b:.2f}")
            if r.get("off_target_heads"):
                words.append(f"off-target: {r['off_target_heads']}")
            true_cf = true_cf_for(truth[r["source_uri"]], r["intervention"], source.shape[0])
            grid.append((" · ".join(words), gray(source), gray(cf), true_cf))
        grids.append((subgroup, rows[0]["intervention"], grid))

    report = HtmlReport("prism_ray demo report")
    report.add_heading("What was run", id="run-info")
    report.add_key_values(run_info)
    report.add_paragraph(
        "The augment job's own run report (filter reasons, errors, accounting) is "
        f"{join_uri(counterfactuals, 'report.html')}.",
        css_class="note",
    )
    report.add_heading("Per subgroup", id="subgroups")
    report.add_table(
        columns=[header for header, _ in COLUMNS.values()],
        rows=[[s.get(key) for key in COLUMNS] for s in stats],
        explanations={header: sentence for header, sentence in COLUMNS.values() if sentence},
        id="demo-table",
    )
    unscored = [s["subgroup"] for s in stats if s["scored"] != "accepted"]
    if unscored:
        report.add_paragraph(
            f"No edit was accepted in {', '.join(unscored)}: its scores describe the rejected edits.",
            css_class="note",
        )
    report.add_heading("Examples", id="examples")
    for k, (subgroup, intervention, grid) in enumerate(grids):
        _add_truth_grid(report, grid, caption=f"{subgroup}: {intervention}", id=f"grid-{k}")
    report.write(str(folder / "report.html"))
    (folder / "summary.json").write_text(json.dumps(stats, indent=2))
    return folder


def _off_target(finished: list[dict]) -> dict:
    """Off-target flips of a subgroup's finished attempts from the manifest's columns (None: the filter was off)."""
    scored = [r for r in finished if r.get("off_target") is not None and not math.isnan(r["off_target"])]
    if not scored:
        return {"off_target_accepted": None, "off_target_rejected": None, "off_target_heads": None}
    off = [r for r in scored if r["off_target"] > 0]
    heads = Counter(h for r in off for h in (r.get("off_target_heads") or "").split(",") if h)
    return {
        "off_target_accepted": sum(r["accepted"] for r in off),
        "off_target_rejected": sum(not r["accepted"] for r in off),
        "off_target_heads": ", ".join(f"{h} ×{n}" for h, n in heads.most_common()) or "none",
    }


def _add_truth_grid(
    report, grid: list[tuple], *, caption: str, id: str, min_display_width: int = 160
) -> None:
    """One row per edit: source | counterfactual | true counterfactual | signed difference (cf − source)."""
    from prism_ray.report.grids import Example, shared_scale
    from prism_ray.report.plots import signed_difference_map

    if not grid:
        report.add_paragraph(f"{caption}: no counterfactuals.", css_class="note")
        return
    scale = shared_scale([Example(s, c, "") for _, s, c, _ in grid])
    width = grid[0][1].shape[1]
    display = width * math.ceil(min_display_width / width) if width < min_display_width else None
    rows = [(label, [s, c, t, signed_difference_map(s, c, scale)]) for label, s, c, t in grid]
    report.add_image_grid(
        rows,
        ["source", "counterfactual", "true counterfactual", "signed difference"],
        column_explanations=[
            "The held-out phantom the edit started from.",
            "The edit made by the fine-tuned model (accepted, or rejected with the reason beside the row).",
            "The same phantom re-rendered with only the intervened attribute changed: what a perfect edit gives.",
            (
                "Counterfactual minus source per pixel: red = brighter, blue = darker, white = unchanged "
                f"(saturates at ±{scale:.0f} grey levels, the same for every row)."
            ),
        ],
        caption=caption,
        id=id,
        display_width=display,
    )
