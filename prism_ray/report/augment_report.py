"""The augment job's HTML run report: what was run, per-subgroup outcomes and filter reasons, sampled example grids."""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np

from prism_ray.report.grids import Example, add_counterfactual_grid
from prism_ray.report.html import HtmlReport
from prism_ray.results.augmentation import finished_attempt, in_quota_set
from prism_ray.results.layout import Layout, digest

log = logging.getLogger("prism_ray.augment")

# Manifest columns the report reads (never the whole table: a 100k-row manifest stays cheap).
_COLUMNS = [
    "cf_id", "source_uri", "subgroup", "intervention", "edit_prompt", "image_uri", "accepted", "quota_status",
    "s_clip", "clip_image_image", "clip_image_text", "reconstruction_error", "reconstruction_psnr",
    "off_target", "off_target_heads", "attempt_rank", "sample_seed",
]  # fmt: skip

SUBGROUP_EXPLANATIONS = {
    "status": "met: the quota is reached; exhausted: the subgroup ran out of sources first; incomplete: the "
    "rounds ran out (planner.max_rounds).",
    "quota": "Accepted counterfactuals asked for (subgroups[].quota).",
    "accepted": "Accepted edits in the quota set: the first attempts of the subgroup's fixed order up to the "
    "quota-th accept.",
    "rejected": "Edits of the quota set that the filter rejected (kept in the manifest with accepted = false).",
    "beyond_quota": "Edits finished after the quota was met (extra work of the last round); kept, and counted "
    "first if the quota is raised.",
    "acceptance_rate": "accepted / (accepted + rejected) in the quota set.",
    "shortfall": "Accepted edits still missing to reach the quota.",
    "mean_s_clip": "Mean CLIP directional score S_CLIP of the accepted edits (PRISM keeps S_CLIP ≥ 0.1).",
}


def rejection_reasons(filter_config, row: dict) -> list[str]:
    """The active thresholds of `FilterConfig.accept` that one manifest row fails (a missing or NaN score
    fails, as there)."""
    reasons = []
    for t in filter_config.thresholds():
        value = row.get(t.key)
        ok = value is not None and not math.isnan(value) and (value >= t.bound if t.is_minimum else value <= t.bound)
        if not ok:
            reasons.append(t.label.format(t.bound))
    return reasons


def active_reason_labels(filter_config) -> list[str]:
    """The labels `rejection_reasons` can give under this filter (one table column each)."""
    return rejection_reasons(filter_config, {})  # a row without scores fails every active check


def write_augment_report(
    config,
    summary: dict,
    *,
    accepted_examples: int = 6,
    rejected_examples: int = 3,
    max_example_rows: int = 60,
) -> str:
    """Write `<output>/report.html` for a finished augment run (`config`: its AugmentConfig, `summary`: the
    run summary) and return its URI.

    Per subgroup at most `accepted_examples` accepted and `rejected_examples` rejected edits of the quota
    set are shown (a seeded sample; fewer when there are many subgroups, `max_example_rows` in all), so a
    2,500-per-subgroup run gives a report of a few MB.
    """
    from prism_ray.data.storage import exists, read_table

    layout = Layout(summary["output"])
    rows = read_table(layout.manifest, columns=_COLUMNS).to_pylist() if exists(layout.manifest) else []
    errors = (
        read_table(layout.errors, columns=["stage", "reason"]).to_pylist() if exists(layout.errors) else []
    )
    quota_set = [r for r in rows if in_quota_set(r)]
    by_group: dict[str, list[dict]] = {g.name: [] for g in config.subgroups}
    for r in quota_set:
        by_group.setdefault(r["subgroup"], []).append(r)

    per_subgroup = max(1, max_example_rows // max(len(by_group), 1))
    n_accepted = min(accepted_examples, per_subgroup)
    n_rejected = min(rejected_examples, max(per_subgroup - n_accepted, 1))
    report = HtmlReport(
        "prism_ray augment report",
        max_images=3 * len(by_group) * (n_accepted + n_rejected),
        max_bytes=10_000_000,  # 256-px thumbnails: a few MB even at the 60-row cap
    )

    short = {n: s["shortfall"] for n, s in summary["subgroups"].items() if s.get("shortfall")}
    if short:
        report.add_paragraph(
            "Incomplete: "
            + ", ".join(f"{n} is {k} accepted short of its quota" for n, k in short.items())
            + ". The outputs are valid; running the same config again continues.",
            id="incomplete",
        )
    fit = summary.get("model_fit") or {}
    if fit.get("warning"):
        report.add_paragraph(
            f"Model fit warning: {fit['below']} of {fit['sources']} sources reconstruct below "
            f"{fit['psnr_threshold']:g} dB PSNR without any edit: the model may not fit these images "
            "(filter.reconstruction_psnr_min rejects the edits of such sources).",
            id="fit-warning",
        )

    report.add_heading("What was run", id="run-info")
    report.add_key_values(_run_info(config, summary), id="run-info-table")

    report.add_heading("Subgroups", id="subgroups")
    table = []
    for name, info in summary["subgroups"].items():
        accepted = [r["s_clip"] for r in by_group.get(name, []) if r["accepted"] and r["s_clip"] is not None]
        table.append({
            "subgroup": name, "status": info["status"], "quota": info["quota"], "accepted": info["accepted"],
            "rejected": info["rejected"], "beyond_quota": info["beyond_quota"],
            "acceptance_rate": info["acceptance_rate"], "shortfall": info["shortfall"],
            "mean_s_clip": float(np.mean(accepted)) if accepted else None,
        })  # fmt: skip
    report.add_table(table, explanations=SUBGROUP_EXPLANATIONS, id="subgroup-table")

    if config.mode == "counterfactual":
        _add_filter_reasons(report, config.filter, by_group)
        if config.filter.off_target.classifier:
            finished = {name: [] for name in by_group}
            for r in rows:
                if finished_attempt(r):
                    finished.setdefault(r["subgroup"], []).append(r)
            _add_off_target(report, config.filter.off_target, finished)
    _add_errors(report, errors)

    report.add_heading("Examples", id="examples")
    report.add_paragraph(
        f"A seeded sample of each subgroup's quota set: up to {n_accepted} accepted and {n_rejected} rejected "
        "edits, with why each rejected one was rejected.",
        css_class="note",
    )
    grid = 0
    for name, group in by_group.items():
        ranked = sorted(group, key=lambda r: digest("report", config.seed, r["cf_id"]))
        accepted = [r for r in ranked if r["accepted"]]
        rejected = [r for r in ranked if not r["accepted"]]
        for verdict, every, picked in (
            ("accepted", accepted, accepted[:n_accepted]),
            ("rejected", rejected, rejected[:n_rejected]),
        ):
            if not picked:
                continue
            caption = f"{name} · {verdict} ({len(picked)} of {len(every):,} shown)"
            if config.mode == "samples":
                _add_samples(report, picked, caption, f"grid-{grid}")
            else:
                examples = [e for e in (_example(config, r) for r in picked) if e is not None]
                if not examples:
                    continue
                add_counterfactual_grid(
                    report, examples, caption=caption, source_name="source", id=f"grid-{grid}"
                )
            grid += 1
    if grid == 0:
        report.add_paragraph("No finished edits to show.", css_class="note")
    uri = report.write(layout.uri("report.html"))
    log.info("augment: report %s", uri)
    return uri


def accounting_line(a: dict) -> str:
    """The run summary's `accounting` in one line (the job's log and the report's run-info table)."""
    return (
        f"augment: accounted: {a['input_rows']} input rows = {a['not_selected']} not selected + "
        f"{a['duplicate_rows_collapsed']} duplicates + {a['rows_with_errors']} row errors + {a['sources']} sources "
        f"({a['sources_with_outputs']} with outputs, {a['sources_failed']} failed, "
        f"{a['sources_not_needed']} not needed: quotas met first)"
    )


def _run_info(config, summary: dict) -> dict:
    f = config.filter
    thresholds = [f"S_CLIP ≥ {f.s_clip_min:g}"]
    for label, value, sign in (
        ("CLIP image-image", f.image_image_min, "≥"),
        ("CLIP image-text", f.image_text_min, "≥"),
        ("reconstruction error", f.reconstruction_error_max, "≤"),
        ("fidelity PSNR", f.reconstruction_psnr_min, "≥"),
    ):
        thresholds.append(f"{label} {sign} {value:g}" if value is not None else f"{label}: off")
    off = f.off_target
    thresholds.append(
        f"off-target: classifier {off.classifier}, no decision flip or move > {off.max_shift:g} outside the "
        f"intervention's heads (implied: {off.implied})"
        if off.classifier
        else "off-target: off (no filter.off_target.classifier)"
    )
    subgroups = []
    for g in config.subgroups:
        what = g.interventions if config.mode == "counterfactual" else [f"sample: {g.prompt!r}"]
        subgroups.append(
            f"{g.name}: selector {g.selector or 'all rows'} → {'; '.join(what)} (quota {g.quota})"
        )
    info = {
        "model": config.model.path,
        "model weights digest": summary.get("model_weights_digest"),
        "mode": config.mode,
        "data": config.data.manifest if config.data is not None else "none (samples)",
        "subgroups and interventions": "\n".join(subgroups),
    }
    if config.mode == "counterfactual":
        inv, edit = config.inversion, config.edit
        info["editing"] = (
            f"{inv.method} inversion, {inv.num_inference_steps} steps; prompt-to-prompt {edit.controller}, "
            + (f"local blend ({edit.blend_mask} mask)" if edit.local_blend else "no local blend")
        )
        info["filter"] = "\n".join(thresholds)
    info.update({
        "manifest rows": summary.get("manifest_rows"),
        "error rows": summary.get("error_rows"),
        "attempts this run": summary.get("attempts_this_run"),
        "errors this run": summary.get("errors_this_run"),
        "wall seconds": summary.get("wall_seconds"),
        "results hash": summary.get("results_hash"),
        "output": summary.get("output"),
    })  # fmt: skip
    if summary.get("accounting"):
        info["accounting"] = accounting_line(summary["accounting"]).removeprefix("augment: ")
    fit = summary.get("model_fit") or {}
    if fit.get("sources"):
        info["model fit"] = (
            f"{fit['below']} of {fit['sources']} sources reconstruct below {fit['psnr_threshold']:g} dB PSNR"
        )
    return info


def _add_filter_reasons(report: HtmlReport, filter_config, by_group: dict[str, list[dict]]) -> None:
    labels = active_reason_labels(filter_config)
    table = []
    for name, group in by_group.items():
        reasons = Counter(
            reason for r in group if not r["accepted"] for reason in rejection_reasons(filter_config, r)
        )
        rejected = sum(not r["accepted"] for r in group)
        table.append({"subgroup": name, "rejected": rejected, **{label: reasons[label] for label in labels}})
    explanations = {
        "rejected": "Edits of the quota set the filter rejected; one edit can fail several thresholds, so the "
        "reason columns may add up to more.",
        **{label: f"Rejected edits that fail '{label}'." for label in labels},
    }
    if "off-target" in labels:
        explanations["off-target"] = (
            "Rejected edits in which a classifier head the intervention should not change flipped its decision "
            "or moved more than filter.off_target.max_shift."
        )
    report.add_heading("Why edits were rejected", id="filter-reasons")
    report.add_table(table, explanations=explanations, id="filter-table")


def _add_off_target(report: HtmlReport, rule, finished: dict[str, list[dict]]) -> None:
    """Off-target flips over every finished attempt of a subgroup (beyond the quota too: what the filter caught)."""
    table = []
    for name, group in finished.items():
        scored = [r for r in group if r["off_target"] is not None]
        off = [r for r in scored if r["off_target"] > 0]
        heads = Counter(h for r in off for h in (r["off_target_heads"] or "").split(",") if h)
        table.append({
            "subgroup": name, "scored": len(scored), "off_target": len(off),
            "off_target_accepted": sum(r["accepted"] for r in off),
            "heads": ", ".join(f"{h} ×{k}" for h, k in heads.most_common()) or "none",
        })  # fmt: skip
    report.add_heading("Off-target flips", id="off-target")
    report.add_table(
        table,
        explanations={
            "scored": "Finished edits (the quota set and beyond it) the classifier scored, source and "
            "counterfactual.",
            "off_target": f"Edits in which a head the intervention should not change flipped its decision (p "
            f"crossed 0.5) or moved more than {rule.max_shift:g}; the filter rejects them.",
            "off_target_accepted": "Off-target edits that were accepted anyway: 0 while the filter is on.",
            "heads": "Which heads moved, and how often.",
        },
        id="off-target-table",
    )


def _add_errors(report: HtmlReport, errors: list[dict]) -> None:
    report.add_heading("Errors", id="errors")
    if not errors:
        report.add_paragraph("No error rows.", css_class="note")
        return
    stages = Counter(e["stage"] for e in errors)
    first = {}
    for e in errors:
        first.setdefault(e["stage"], e["reason"][:300])
    table = [{"stage": s, "rows": k, "first reason": first[s]} for s, k in stages.most_common()]
    report.add_table(
        table,
        explanations={
            "rows": "Error rows of this stage in errors.parquet (one per failed source or attempt)."
        },
        id="error-table",
    )


def _example(config, row: dict) -> Example | None:
    """The source as the model saw it (square, resized to the counterfactual) and its counterfactual, or
    None when either cannot be read any more (a moved source: the report goes on without it)."""
    from PIL import Image

    from prism_ray.data.images import decode_image, make_square
    from prism_ray.data.storage import read_image, read_image_bytes

    decode = config.data.decode
    try:
        counterfactual = read_image(row["image_uri"])
        source = decode_image(read_image_bytes(row["source_uri"]), row["source_uri"], decode, min_side=1)
    except (OSError, ValueError) as err:
        log.warning("augment report: example %s skipped: %s", row["cf_id"], err)
        return None
    source = make_square(source, decode.square, decode.alpha_background)
    h, w = counterfactual.shape[:2]
    if source.shape[:2] != (h, w):
        source = np.asarray(Image.fromarray(source).resize((w, h), Image.Resampling.BICUBIC))
    scores = [f"S_CLIP {row['s_clip']:.2f}"] if row["s_clip"] is not None else []
    if row.get("reconstruction_psnr") is not None:
        scores.append(f"PSNR {row['reconstruction_psnr']:.1f} dB")
    if row.get("off_target_heads"):
        scores.append(f"off-target: {row['off_target_heads']}")
    verdict = (
        "accepted"
        if row["accepted"]
        else "rejected: " + (", ".join(rejection_reasons(config.filter, row)) or "?")
    )
    name = row["source_uri"].rsplit("/", 1)[-1]
    return Example(
        source, counterfactual, f"{verdict} · {name} · {row['intervention']} · {'; '.join(scores)}"
    )


def _add_samples(report: HtmlReport, rows: list[dict], caption: str, id: str) -> None:
    from prism_ray.data.storage import read_image

    images = []
    for r in rows:
        try:
            images.append((f"{r['edit_prompt']} (seed {r['sample_seed']})", [read_image(r["image_uri"])]))
        except (OSError, ValueError) as err:
            log.warning("augment report: sample %s skipped: %s", r["cf_id"], err)
    if images:
        report.add_image_grid(
            images, ["sample"], column_explanations=["Text-to-image sample of the subgroup's prompt."],
            caption=caption, id=id,
        )  # fmt: skip
