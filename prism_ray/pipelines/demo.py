"""The embedded default: phantoms -> fine-tune (Ray Train + DeepSpeed) -> counterfactuals (Ray Data) -> report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from prism_ray.config import BaseConfig
from prism_ray.engine.settings import EditConfig, InversionConfig
from prism_ray.scoring.filter import FilterConfig


class DemoConfig(BaseConfig):
    """Everything the README's demo command runs; every field can be overridden with --set."""

    out: str = Field("outputs/demo", min_length=1, description="local folder for data, runs and results")
    model: str = Field("tiny", description="starting model family (the shipped phantom-trained tiny family)")
    n_subjects: int = Field(240, ge=20, le=100_000)
    seed: int = Field(0, ge=0)
    finetune_steps: int = Field(30, ge=1)
    finetune_workers: int = Field(2, ge=1)
    finetune_zero_stage: int = Field(2, ge=0, le=3)
    quota: int = Field(4, ge=1, description="accepted counterfactuals per subgroup")
    num_actors: int = Field(1, ge=1)
    # 20 DDIM steps (not the reference 50) keep the demo in minutes on a laptop CPU; the rest of
    # null-text inversion is the reference (10 inner steps, lr schedule, early stop).
    inversion: InversionConfig = InversionConfig(num_inference_steps=20)
    # PRISM's prompt-to-prompt defaults plus local blend with the noise-difference mask: the tiny
    # family's cross-attention is too diffuse for the attention mask, and without a blend its edits
    # also move findings they should keep (BENCHMARKS.md, phantom benchmark).
    edit: EditConfig = EditConfig(local_blend=True, blend_mask="noise")
    filter: FilterConfig = FilterConfig()


SUBGROUPS = [
    # (name, selector, intervention): the papers' device-removal and disease-removal edits.
    ("remove_devices", {"Support Devices": 1.0}, "Support Devices=false"),
    ("remove_effusion", {"Pleural Effusion": 1.0}, "Pleural Effusion=false"),
]


def _say(step: str, message: str) -> None:
    print(f"[demo] {step}: {message}", flush=True)


def run(config: DemoConfig, runner=None) -> Path:
    """Run the whole mission on phantoms and return the report folder (`runner`: the augment job's)."""
    from prism_ray.pipelines import augment
    from prism_ray.results.summary import RunIncomplete
    from prism_ray.pipelines import finetune
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset

    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    _say("1/4 data", f"writing {config.n_subjects} phantom chest X-rays with planted biases")
    data = write_phantom_dataset(str(out / "data"), PhantomDatasetConfig(n_subjects=config.n_subjects, seed=config.seed))

    _say("2/4 fine-tune", f"{config.finetune_steps} steps, {config.finetune_workers} Ray Train workers, ZeRO-{config.finetune_zero_stage}")
    ft = finetune.FinetuneConfig.model_validate(
        {
            "model": {"path": config.model},
            "data": {"manifest": data.manifest_uri, "split": "train"},
            "train": {
                "max_steps": config.finetune_steps,
                "micro_batch_size": 4,
                "learning_rate": 1e-5,
                "zero_stage": config.finetune_zero_stage,
                "checkpoint_every": config.finetune_steps,
                "log_every": 5,
                "seed": config.seed,
            },
            "compute": {"num_workers": config.finetune_workers, "cpus_per_worker": 0.5},
            "run": {"storage_path": str(out / "runs"), "name": "finetune"},
        }
    )
    tuned = finetune.run(ft)
    _say("2/4 fine-tune", f"step {tuned.final_step}, model exported to {tuned.model_path}")

    _say("3/4 counterfactuals", f"{len(SUBGROUPS)} subgroups x {config.quota} accepted, Ray actors")
    aug = augment.AugmentConfig.model_validate(
        {
            "model": {"path": tuned.model_path},
            "data": {"manifest": data.manifest_uri, "split": "test"},
            "subgroups": [
                {"name": name, "selector": selector, "interventions": [spec], "quota": config.quota}
                for name, selector, spec in SUBGROUPS
            ],
            "inversion": config.inversion.model_dump(),
            "edit": config.edit.model_dump(),
            "filter": config.filter.model_dump(),
            "output": str(out / "counterfactuals"),
            "seed": config.seed,
            "compute": {"num_actors": config.num_actors, "batch_size": 4},
        }
    )
    try:
        summary, incomplete = augment.run(aug, runner=runner), None
    except RunIncomplete as err:  # still report what was made, then end non-zero
        summary, incomplete = err.summary, err

    _say("4/4 report", "scoring against the true counterfactuals")
    # The classifier ships beside the starting family (fine-tuning exports only the diffusers parts).
    report = write_report(out, str(out / "counterfactuals"), data.ground_truth_uri, config.model)
    minutes = (time.perf_counter() - t0) / 60
    _say("done", f"{minutes:.1f} min. Counterfactuals: {out / 'counterfactuals'}  Report: {report / 'report.md'}")
    (report / "augment_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if incomplete is not None:
        raise incomplete
    return report


def write_report(out: Path, counterfactuals: str, ground_truth_uri: str, model_root: str) -> Path:
    """Contact sheet (source | counterfactual | true counterfactual | |difference|) + markdown summary;
    `model_root` is the family whose shipped classifier (if any) scores the edits."""
    from prism_ray.models.loading import resolve_model_root
    from prism_ray.report.contact_sheet import save_contact_sheet
    from prism_ray.phantom.truth import classifier_path, gray, score_against_truth, true_cf_for
    from prism_ray.data.storage import join_uri, read_image, read_table

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
