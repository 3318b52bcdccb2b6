"""Markdown reports with their pictures: the demo's counterfactuals scored against ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_demo_report(out: Path, counterfactuals: str, ground_truth_uri: str, model_root: str) -> Path:
    """Contact sheet (source | counterfactual | true counterfactual | |difference|) + markdown summary;
    `model_root` is the family whose shipped classifier (if any) scores the edits."""
    from prism_ray.data.storage import join_uri, read_image, read_table
    from prism_ray.models.loading import resolve_model_root
    from prism_ray.phantom.truth import classifier_path, gray, score_against_truth, true_cf_for
    from prism_ray.report.contact_sheet import save_contact_sheet

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    # The quota sets: rows finished beyond a quota (or set aside) are kept in the manifest, not reported here.
    manifest = [
        r for r in read_table(join_uri(counterfactuals, "manifest.parquet")).to_pylist()
        if r.get("quota_status") in (None, "in_quota")
    ]
    truth = {r["image_uri"]: r for r in read_table(ground_truth_uri).to_pylist()}
    accepted = [r for r in manifest if r["accepted"]]
    lines = ["# prism_ray demo report", "", f"Counterfactual rows: {len(manifest)} ({len(accepted)} accepted by S_CLIP).", ""]
    classifier = classifier_path(resolve_model_root(model_root))
    clf = None
    if classifier is not None:
        from prism_ray.models.classifier import classifier_labels, load_classifier, predict_proba

        clf = load_classifier(classifier)
        heads = classifier_labels(clf)
    tiles, labels, stats = [], [], []
    for subgroup in sorted({r["subgroup"] for r in manifest}):
        attempted = [r for r in manifest if r["subgroup"] == subgroup and r.get("image_uri")]
        rows = [r for r in attempted if r["accepted"]]
        scope = "accepted"
        if not rows:  # still show (and score) what the filter rejected: pictures explain why
            rows, scope = attempted, "rejected (none accepted)"
        if not rows:
            lines.append(f"- {subgroup}: no counterfactuals")
            continue
        src = [read_image(r["source_uri"]) for r in rows]
        cfs = [read_image(r["image_uri"]) for r in rows]
        trues = [true_cf_for(truth[r["source_uri"]], r["intervention"], src[0].shape[0]) for r in rows]
        scores = score_against_truth(src, cfs, trues)
        entry = {
            "subgroup": subgroup,
            "scored": scope,
            "accepted": sum(r["accepted"] for r in attempted),
            "attempted": len(attempted),
            "mean_s_clip": float(np.mean([r["s_clip"] for r in rows])),
            # how well the sources inverted: unedited reconstruction vs source latent, relative squared
            "mean_reconstruction_error": float(np.mean([r["reconstruction_error"] for r in rows])),
            "l1_to_source": float(scores.l1_to_source.mean()),
            "error_to_true_cf": float(scores.error_to_true.mean()),
            "no_edit_error_to_true_cf": float(scores.source_to_true.mean()),
        }
        if clf is not None:
            from prism_ray.phantom.truth import TARGET_HEAD

            p_src = predict_proba(clf, np.stack([gray(x) for x in src]))
            p_cf = predict_proba(clf, np.stack([gray(x) for x in cfs]))
            head = TARGET_HEAD.get(rows[0]["intervention"].split("=")[0])
            if head in heads:
                k = heads.index(head)
                entry["target_cpg"] = float(np.abs(p_cf[:, k] - p_src[:, k]).mean())
                entry["target_flip_rate"] = float(((p_cf[:, k] >= 0.5) != (p_src[:, k] >= 0.5)).mean())
        stats.append(entry)
        for r, s, c, t in list(zip(rows, src, cfs, trues))[:4]:
            diff = np.clip(np.abs(gray(c).astype(int) - gray(s).astype(int)) * 4, 0, 255).astype(np.uint8)
            tiles += [gray(s), gray(c), t, diff]
            labels += ["source", "cf" + ("" if r["accepted"] else " (rejected)"), "true cf", "|cf-src|x4"]
    if tiles:
        save_contact_sheet(tiles, str(report / "counterfactuals.png"), ncols=4, labels=labels, upscale=3)
        lines += ["![counterfactuals](counterfactuals.png)", ""]
    if stats:
        keys = list(stats[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for s in stats:
            lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in s.values()) + " |")
    (report / "report.md").write_text("\n".join(lines) + "\n")
    (report / "summary.json").write_text(json.dumps(stats, indent=2))
    return report
