"""The demo's HTML report: its counterfactuals scored against the phantoms' true counterfactuals, with the
decoder floor and the error inside / outside the attribute's region beside them, off-target flips per
subgroup and what that check covers, and example grids source | counterfactual | true counterfactual |
signed difference | difference outside the region.

`write_demo_report` reads the augment output, the ground truth, the classifier and the VAE;
`truth_scores` and `render_demo_report` work on plain arrays and dicts.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from prism_ray.phantom.truth import (
    TARGET_HEAD,
    classifier_path,
    gray,
    region_errors,
    region_for,
    true_cf_for,
    vae_round_trip,
)
from prism_ray.results.augmentation import finished_attempt, in_quota_set
from prism_ray.scoring.classification import flipped

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
            "moved more than filter.off_target.max_shift), counted from the manifest's off_target column over the "
            "quota set (the attempted column): 0 while the off-target filter is on; empty when it is off (not measured). It counts "
            "the classifier's decisions, not pixels: see 'What the off-target check covers'."
        ),
    ),
    "off_target_rejected": (
        "off-target flips, rejected",
        "Attempts of the quota set with such a flip, which the off-target filter rejected.",
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

# What is compared with the true counterfactual: kind -> (summary.json key prefix, row label, sentence).
TRUTH_KINDS = {
    "edit": (
        "error_to_true_cf",
        "counterfactual",
        "The edit, through the fine-tuned model's inversion, editing pass and VAE.",
    ),
    "no_edit": (
        "no_edit_error_to_true_cf",
        "no edit (the source)",
        (
            "The unedited source, which pays no VAE round trip: over the whole image it beats every edit whenever "
            "the round trip costs more than the change (small regions such as devices). Compare inside the region."
        ),
    ),
    "vae_no_edit": (
        "vae_no_edit_error_to_true_cf",
        "no edit, through the VAE",
        (
            "The source through the same VAE (encode, decode), unedited: 'no edit' at the price of the round trip. "
            "(bench_phantom's no_edit row, the unedited null-text reconstruction, also pays the inversion.)"
        ),
    ),
    "floor": (
        "decoder_floor",
        "decoder floor (true cf through the VAE)",
        (
            "The true counterfactual through the same VAE (bench_phantom's true_vae row): the closest any edit can "
            "come through this decoder. The VAE does not reproduce the phantom's grain, so most of an edit's "
            "whole-image error is this floor."
        ),
    ),
}
# Where the error is measured: region -> (summary.json key suffix, column header, sentence).
REGIONS = {
    "whole": ("", "whole image", "Mean |image − true counterfactual| on [0, 1] over every pixel."),
    "inside": (
        "_in_region",
        "inside the region",
        (
            "The same over the attribute's region (phantom.render.attribute_mask: where the intervention can change "
            "this subject's pixels, e.g. every device's place): the edit helps where its error here is below "
            "no edit's; the floor is the best it can do."
        ),
    ),
    "outside": (
        "_outside_region",
        "outside the region",
        (
            "The same everywhere else, where the true counterfactual is the source: what the edit and the round "
            "trip changed that should have stayed. The floor's value is the round trip's share; the rest is the "
            "edit's."
        ),
    ),
}


def truth_key(kind: str, region: str) -> str:
    """summary.json key of one kind's error in one region, e.g. 'decoder_floor_outside_region'."""
    return TRUTH_KINDS[kind][0] + REGIONS[region][0]


def truth_scores(
    sources: list[np.ndarray],
    cfs: list[np.ndarray],
    trues: list[np.ndarray],
    regions: list[np.ndarray],
    sources_vae: list[np.ndarray],
    trues_vae: list[np.ndarray],
) -> dict[str, float]:
    """Errors to the true counterfactuals (`truth_key` -> value, pooled over pixels as bench_phantom pools
    them) of the edits, of no edit, of no edit through the VAE, and of the decoder floor (the truth through
    the VAE), over the whole image and inside / outside each source's region; uint8 (R, R) images."""
    images = {"edit": cfs, "no_edit": sources, "vae_no_edit": sources_vae, "floor": trues_vae}
    out = {}
    for kind, shown in images.items():
        for region, value in region_errors(shown, trues, regions).pooled().items():
            out[truth_key(kind, region)] = value
    return out


def truth_sentence(entry: dict) -> str:
    """What the edit changed and what the round trip did, in words, from one subgroup's summary entry."""

    def v(kind: str, region: str) -> float:
        return entry[truth_key(kind, region)]

    inside = "closer to" if v("edit", "inside") < v("no_edit", "inside") else "no closer to"
    outside_floor = v("floor", "outside")
    outside = v("edit", "outside")
    share = f"{outside_floor / outside:.0%}" if outside > 0 else "all"
    return (
        f"{entry['subgroup']} ({entry['intervention']}): inside the attribute's region the edit is "
        f"{v('edit', 'inside'):.3f} from the true counterfactual vs {v('no_edit', 'inside'):.3f} with no edit "
        f"({inside} the truth; the decoder floor there is {v('floor', 'inside'):.3f}). Outside the region, where "
        f"nothing should change, its error is {outside:.3f}, of which the VAE round trip alone accounts for "
        f"{outside_floor:.3f} ({share}). Over the whole image: edit {v('edit', 'whole'):.3f}, decoder floor "
        f"{v('floor', 'whole'):.3f}, no edit {v('no_edit', 'whole'):.3f} (the source pays no round trip)."
    )


def off_target_scope(
    classifier_name: str | None, heads: list[str] | None, resolution: int | None, max_shift: float
) -> str:
    """What "0 off-target flips" does and does not say, in one paragraph."""
    if not classifier_name:
        return "The off-target filter was off: no edit was checked for side effects."
    which = ", ".join(heads) if heads else "its heads"
    size = f"{resolution}-px " if resolution else ""
    return (
        f"The off-target check reads the decisions of one {size}attribute classifier ({classifier_name}; heads "
        f"{which}) on the source and the edit: an edit fails it when a head its intervention does not name flips "
        f"(p crosses 0.5) or moves by more than {max_shift:g}. It does not compare pixels. A remnant of a removed "
        "device, or a device erased while removing effusion, passes it unless the classifier reads it as a flip, "
        "so '0 off-target flips' means the classifier saw no other finding change, not that nothing else changed. "
        "The error outside the attribute's region (table above) and each example's change outside it (below) "
        "show what else the edit changed."
    )


def write_demo_report(
    out: Path,
    counterfactuals: str,
    ground_truth_uri: str,
    model_root: str,
    *,
    filter_config,
    run_info: dict[str, Any],
    vae_model: str | None = None,
    accepted_examples: int = 4,
    rejected_examples: int = 2,
) -> Path:
    """Write `out/report/report.html` and `summary.json` (one entry per subgroup) and return the folder.

    `model_root` is the family whose shipped classifier (if any) scores the target head; `vae_model` the
    model whose VAE made the edits (default `model_root`): the decoder floor passes the truth through it.
    `filter_config` is the augment job's filter (the reasons shown beside rejected examples).
    """
    from prism_ray.data.storage import join_uri, read_image, read_table
    from prism_ray.models.loading import load_sd_components, resolve_model_root
    from prism_ray.report.augment_report import rejection_reasons

    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    finished = [
        r
        for r in read_table(join_uri(counterfactuals, "manifest.parquet")).to_pylist()
        if finished_attempt(r) and r.get("image_uri")
    ]
    # The quota sets are scored and counted (attempted, accepted, off-target flips: one scope); rejected
    # examples may come from any finished attempt.
    manifest = [r for r in finished if in_quota_set(r)]
    truth = {r["image_uri"]: r for r in read_table(ground_truth_uri).to_pylist()}
    classifier = classifier_path(resolve_model_root(model_root))
    clf = heads = None
    if classifier is not None:
        from prism_ray.models.classifier import classifier_labels, load_classifier, predict_proba

        clf = load_classifier(classifier)
        heads = classifier_labels(clf)
    vae = load_sd_components(vae_model or model_root, device="cpu").vae

    stats, grids = [], []
    for subgroup in sorted({r["subgroup"] for r in manifest}):
        attempted = [r for r in manifest if r["subgroup"] == subgroup]
        accepted = [r for r in attempted if r["accepted"]]
        rows, scope = (accepted, "accepted") if accepted else (attempted, "rejected (none accepted)")
        # Rejected examples from every finished attempt, off-target ones first: they show what the filter caught.
        rejected = [r for r in finished if r["subgroup"] == subgroup and not r["accepted"]]
        rejected.sort(key=lambda r: not (r.get("off_target") or 0) > 0)
        shown = accepted[:accepted_examples] + rejected[:rejected_examples]
        cases = {}  # cf_id -> source, cf, true cf, region, source through the VAE, true cf through the VAE
        for r in {r["cf_id"]: r for r in rows + shown}.values():
            source, cf = gray(read_image(r["source_uri"])), gray(read_image(r["image_uri"]))
            gt = truth[r["source_uri"]]
            cases[r["cf_id"]] = [source, cf, true_cf_for(gt, r["intervention"], source.shape[0]),
                                 region_for(gt, r["intervention"], source.shape[0])]  # fmt: skip
        ids = list(cases)
        resolution = cases[ids[0]][0].shape[0]
        through = vae_round_trip(vae, [cases[i][0] for i in ids] + [cases[i][2] for i in ids], resolution)
        for k, i in enumerate(ids):
            cases[i] += [through[k], through[len(ids) + k]]
        scored = zip(*(cases[r["cf_id"]] for r in rows), strict=True)
        src, cfs, trues, regions, src_vae, true_vae = (list(x) for x in scored)
        entry = {
            "subgroup": subgroup,
            "intervention": rows[0]["intervention"],
            "scored": scope,
            "attempted": len(attempted),
            "accepted": len(accepted),
            "mean_s_clip": float(np.mean([r["s_clip"] for r in rows])),
            "mean_reconstruction_error": float(np.mean([r["reconstruction_error"] for r in rows])),
            "l1_to_source": float(region_errors(cfs, src, regions).whole.mean()),
            **truth_scores(src, cfs, trues, regions, src_vae, true_vae),
            **_off_target(attempted),  # the same scope as attempted / accepted: the quota set
        }
        target = {}
        if clf is not None:
            head = TARGET_HEAD.get(rows[0]["intervention"].split("=")[0])
            if head in heads:
                k = heads.index(head)
                p_src = predict_proba(clf, np.stack(src))[:, k]
                p_cf = predict_proba(clf, np.stack(cfs))[:, k]
                entry["target_cpg"] = float(np.abs(p_cf - p_src).mean())
                entry["target_flip_rate"] = float(flipped(p_src, p_cf).mean())
                target = {r["cf_id"]: (head, a, b) for r, a, b in zip(rows, p_src, p_cf, strict=True)}
        stats.append(entry)
        grid = []
        for r in shown:
            source, cf, true_cf, region, source_vae, _ = cases[r["cf_id"]]
            why = (
                "accepted" if r["accepted"] else "rejected: " + ", ".join(rejection_reasons(filter_config, r))
            )
            words = [why, r["source_uri"].rsplit("/", 1)[-1], f"S_CLIP {r['s_clip']:.2f}"]
            if r["cf_id"] in target:
                head, a, b = target[r["cf_id"]]
                words.append(f"{head} p {a:.2f}→{b:.2f}")
            if r.get("off_target_heads"):
                words.append(f"off-target: {r['off_target_heads']}")
            words.append(_example_change(source, cf, true_cf, region, source_vae))
            grid.append((" · ".join(words), source, cf, true_cf, region))
        grids.append((subgroup, rows[0]["intervention"], grid))

    off = filter_config.off_target
    resolution = int(getattr(clf.config, "image_size", 0)) if clf is not None else None
    scope_text = off_target_scope(off.classifier, heads, resolution, off.max_shift)
    render_demo_report(
        str(folder / "report.html"),
        run_info=run_info,
        stats=stats,
        grids=grids,
        off_target_scope=scope_text,
        augment_report=join_uri(counterfactuals, "report.html"),
    )
    (folder / "summary.json").write_text(json.dumps(stats, indent=2))
    return folder


def _example_change(source, cf, true_cf, region, source_vae) -> str:
    """One example's errors in words: inside the region vs no edit, the change outside vs the VAE's alone."""
    inside = region_errors([cf, source], [true_cf, true_cf], [region, region]).inside
    outside = region_errors([cf, source_vae], [source, source], [region, region]).outside
    return (
        f"in region: error {inside[0]:.3f} (no edit {inside[1]:.3f}) · "
        f"outside: changed {outside[0]:.3f} (VAE alone {outside[1]:.3f})"
    )


def render_demo_report(
    path: str,
    *,
    run_info: dict[str, Any],
    stats: list[dict],
    grids: list[tuple[str, str, list[tuple]]],
    off_target_scope: str,
    augment_report: str,
) -> str:
    """Write the report from plain data and return `path`.

    `stats`: one summary entry per subgroup (COLUMNS keys, `truth_key` keys, `intervention`, `scored`).
    `grids`: (subgroup, intervention, rows) with rows of (label, source, cf, true cf, region), uint8 (R, R)
    images and a boolean (R, R) region. `off_target_scope`: `off_target_scope`'s paragraph.
    """
    from prism_ray.report.html import HtmlReport

    report = HtmlReport("prism_ray demo report")
    report.add_heading("What was run", id="run-info")
    report.add_key_values(run_info)
    report.add_paragraph(
        f"The augment job's own run report (filter reasons, errors, accounting) is {augment_report}.",
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

    report.add_heading("Error to the true counterfactual", id="truth")
    report.add_paragraph(
        "Every counterfactual is decoded by the model's VAE, which loses the phantom's grain: most of an edit's "
        "error over the whole image is that round trip, not the edit. So the error is split by the attribute's "
        "region and shown beside the decoder floor (the true counterfactual through the same VAE). Inside the "
        "region an edit helps when its error is below no edit's; outside it, the closer to the floor, the less "
        "the edit changed what it should have left alone."
    )
    report.add_table(
        columns=["subgroup", "compared with the truth", *(header for _, header, _ in REGIONS.values())],
        rows=[
            [s["subgroup"], label, *(s.get(truth_key(kind, region)) for region in REGIONS)]
            for s in stats
            for kind, (_, label, _) in TRUTH_KINDS.items()
        ],
        explanations={
            "compared with the truth": " ".join(f"{label}: {text}" for _, label, text in TRUTH_KINDS.values()),
            **{header: sentence for _, header, sentence in REGIONS.values()},
        },
        id="truth-table",
    )
    report.add_list([truth_sentence(s) for s in stats], id="truth-sentences")

    report.add_heading("What the off-target check covers", id="off-target-scope")
    report.add_paragraph(off_target_scope)

    report.add_heading("Examples", id="examples")
    for k, (subgroup, intervention, grid) in enumerate(grids):
        _add_truth_grid(report, grid, caption=f"{subgroup}: {intervention}", id=f"grid-{k}")
    return report.write(path)


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


def _add_truth_grid(report, grid: list[tuple], *, caption: str, id: str, min_display_width: int = 160) -> None:
    """One row per edit: source | counterfactual | true counterfactual | signed difference (cf − source) |
    the same difference outside the attribute's region only."""
    from prism_ray.report.grids import Example, shared_scale
    from prism_ray.report.plots import signed_difference_map

    if not grid:
        report.add_paragraph(f"{caption}: no counterfactuals.", css_class="note")
        return
    scale = shared_scale([Example(g[1], g[2], "") for g in grid])
    width = grid[0][1].shape[1]
    display = width * math.ceil(min_display_width / width) if width < min_display_width else None
    rows = [
        (label, [s, c, t, signed_difference_map(s, c, scale), signed_difference_map(s, np.where(m, s, c), scale)])
        for label, s, c, t, m in grid
    ]
    report.add_image_grid(
        rows,
        ["source", "counterfactual", "true counterfactual", "signed difference", "outside the region"],
        column_explanations=[
            "The held-out phantom the edit started from.",
            "The edit made by the fine-tuned model (accepted, or rejected with the reason beside the row).",
            "The same phantom re-rendered with only the intervened attribute changed: what a perfect edit gives.",
            (
                "Counterfactual minus source per pixel: red = brighter, blue = darker, white = unchanged "
                f"(saturates at ±{scale:.0f} grey levels, the same for every row)."
            ),
            (
                "The same difference outside the attribute's region only (the region is white): what the edit and "
                "the VAE changed where the true counterfactual equals the source, e.g. an erased device."
            ),
        ],
        caption=caption,
        id=id,
        display_width=display,
    )
