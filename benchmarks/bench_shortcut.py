"""Expose -> fix -> verify on ground truth: a classifier that takes a shortcut, the audit that exposes it,
counterfactual augmentation that fixes it (PRISM's Table 3), and the audit that shows it gone.

The phantoms plant the shortcut: in the train split tubes / ECG leads follow pleural effusion with
strength c (P(device | effusion) = c, P(device | no effusion) = 1 - c; 0.5 is no correlation), and
the effusion is subtle (severity 0.2-0.5: a blunted costophrenic angle, not a white lung base),
so the device is the easier cue. Valid and test are independent of it. Pacemakers are off, so
"Support Devices" means exactly tube / ECG. Steps:

1. one phantom dataset per correlation c (same subjects, seed and anatomy; only the device draws
   that c changes differ, so a subject whose device status is the same has byte-identical images);
2. counterfactuals once, on the c = 1 train split (every effusion image has a device, no other
   image has one: the largest pool of both edit directions): the augment job with
   do(Support Devices=0) on effusion images and do(Support Devices=1) on clean ones, the tiny
   family and the filter as shipped; for each c the counterfactuals whose source image is
   byte-identical in that dataset are that dataset's (their source row is the same subject);
3. plain text-to-image samples of the same two target captions (augment, mode: samples);
4. for each c, the experiment job (in-process): arms (a) original, (b) + samples, (c) +
   counterfactuals, (d) group-balanced resampling, (e) Group-DRO; the same step budget, seeds
   0..k-1, the model of each run selected by its best validation worst-group accuracy (stated here,
   in advance: `train.select: valid_worst_group`), scored on the independent test split;
5. at the main correlation, a learning curve over the number of counterfactuals per direction;
6. the audit job on the main correlation's test split with the (a) and (c) classifiers of the first seed
   side by side: do(Support Devices=0/1); the effusion head of each is flagged when it changes more
   than under the control reconstruction;
7. `report.html` (sweep plot, learning curve, audit table, example pairs) and `result.json`.

    python benchmarks/bench_shortcut.py --out outputs/bench_shortcut          # BENCHMARKS.md's run
    python benchmarks/bench_shortcut.py --out /tmp/s --quick                  # seconds: the CI lane

How good the counterfactuals' labels are is measured against the phantom truth: an edit's error to
its true counterfactual (the same subject, device changed) against its source's, and the decision of
a judge that cannot be fooled by the shortcut (the c = 0.5 original classifier) on each edit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from bench_experiment import allow_shortfall  # an augment run in this process; a shortfall is reported

from prism_ray.scoring.classification import decision

HEADS = {"pleural_effusion": "Pleural Effusion", "support_devices": "Support Devices"}
ARM_LABELS = {
    "original": "(a) original",
    "sd_samples": "(b) + text-to-image samples",
    "counterfactuals": "(c) + counterfactuals",
    "group_balanced": "(d) group-balanced resampling",
    "group_dro": "(e) Group-DRO",
}
EDITS = {  # augment subgroup -> (selector, intervention, the edit's labels)
    "remove_devices": ({"Pleural Effusion": 1, "Support Devices": 1}, "Support Devices=0", (1, 0)),
    "add_devices": ({"Pleural Effusion": 0, "Support Devices": 0}, "Support Devices=1", (0, 1)),
}
SAMPLE_PROMPTS = {  # samples subgroup -> (caption, labels): the same targets as the two edit directions
    "effusion_no_device": ("Chest X-ray showing Pleural Effusion", {"Pleural Effusion": 1.0, "Support Devices": 0.0}),
    "device_no_effusion": ("Chest X-ray showing Support Devices", {"Pleural Effusion": 0.0, "Support Devices": 1.0}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_shortcut")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline end to end, not the figures")
    p.add_argument("--subjects", type=int, default=2000)
    p.add_argument("--correlations", type=float, nargs="+", default=[0.5, 0.75, 0.9, 1.0])
    p.add_argument("--main", type=float, default=0.9, help="the correlation of the learning curve and the audit")
    p.add_argument("--severity", type=float, nargs=2, default=[0.2, 0.5])
    p.add_argument("--per-direction", type=int, default=512,
                   help="counterfactuals per direction in the sweep and the main comparison")
    p.add_argument("--curve", type=int, nargs="+", default=[32, 128, 512], help="learning-curve sizes")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of inversion, edit and samples")
    p.add_argument("--inner", type=int, default=2, help="null-text inner steps")
    p.add_argument("--train-steps", type=int, default=300, help="optimiser steps per classifier (every arm)")
    p.add_argument("--seeds", type=int, default=6, help="6: the exact sign-flip test can reach p < 0.05")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first..first+n-1 (a confirmation run takes seeds no earlier run has seen)")
    p.add_argument("--audit-sources", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.subjects, args.correlations, args.main = 160, [0.5, 1.0], 1.0
        args.per_direction, args.curve, args.steps, args.inner = 4, [2, 4], 2, 1
        args.train_steps, args.seeds, args.audit_sources = 20, 3, 6
    if args.main not in args.correlations:
        p.error(f"--main {args.main} must be one of --correlations {args.correlations}")
    if max(args.curve) < args.per_direction:
        args.curve = sorted({*args.curve, args.per_direction})
    return args


# --- data -------------------------------------------------------------------------------------


def dataset_config(args, c: float):
    from prism_ray.phantom.dataset import PhantomDatasetConfig

    return PhantomDatasetConfig(
        n_subjects=args.subjects, seed=25, p_effusion=0.4, effusion_severity=tuple(args.severity),
        p_pacemaker_given_cardiomegaly=0.0, p_pacemaker_given_no_cardiomegaly=0.0,
        p_other_device=0.5, p_other_device_given_effusion_train=c, p_other_device_given_no_effusion_train=1.0 - c,
    )


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def counterfactuals_for(cf_folder: Path, source_manifest: str, manifest: str, out: Path) -> int:
    """Write `out/manifest.parquet`: the accepted in-quota counterfactuals of `cf_folder` whose source image is
    byte-identical in `manifest` (same subject), their source_uri pointing at that dataset's row."""
    import pyarrow as pa

    from prism_ray.data.storage import read_table, write_table
    from prism_ray.pipelines.experiment import augment_rows

    by_subject = {r["subject_id"]: r["image_uri"] for r in read_table(manifest).to_pylist() if r["split"] == "train"}
    subject_of = {r["image_uri"]: r["subject_id"] for r in read_table(source_manifest).to_pylist()}
    rows = []
    for row in augment_rows(str(cf_folder)).to_pylist():
        target = by_subject.get(subject_of[row["source_uri"]])
        if target is not None and sha256(target) == sha256(row["source_uri"]):
            rows.append(dict(row, source_uri=target))
    out.mkdir(parents=True, exist_ok=True)
    write_table(pa.Table.from_pylist(rows, schema=read_table(str(cf_folder / "manifest.parquet")).schema),
                str(out / "manifest.parquet"))
    return len(rows)


# --- the generative steps ------------------------------------------------------------------------


def method(args) -> dict:
    return {
        "model": {"path": "tiny", "device": "cpu"},
        "inversion": {"num_inference_steps": args.steps, "num_inner_steps": args.inner, "learning_rate": 0.05},
        "edit": {"local_blend": True, "blend_mask": "noise"},
        "compute": {"batch_size": 4, "torch_threads": args.threads},
        "planner": {"initial_acceptance": 0.9},  # the tiny family's edits pass S_CLIP almost always
    }


def make_counterfactuals(args, manifest: str, out: Path) -> dict:
    from prism_ray.config import build_config
    from prism_ray.pipelines import augment

    config = build_config(augment.AugmentConfig, {
        **method(args),
        "data": {"manifest": manifest, "split": "train"},
        "subgroups": [{"name": name, "selector": sel, "interventions": [spec], "quota": max(args.curve)}
                      for name, (sel, spec, _) in EDITS.items()],
        "output": str(out),
    })
    return allow_shortfall(augment.run, config)


def make_samples(args, out: Path) -> dict:
    from prism_ray.config import build_config
    from prism_ray.pipelines import augment

    config = build_config(augment.AugmentConfig, {
        **method(args),
        "mode": "samples",
        "sampling": {"num_inference_steps": args.steps, "batch_size": 8},
        "subgroups": [{"name": name, "prompt": prompt, "quota": args.per_direction}
                      for name, (prompt, _) in SAMPLE_PROMPTS.items()],
        "output": str(out),
    })
    return allow_shortfall(augment.run, config)


# --- the experiment and the audit ----------------------------------------------------------------


def run_experiment(args, manifest: str, out: Path, *, counterfactuals: Path, samples: Path | None,
                   limit: int, fixes: bool) -> list[dict]:
    """The experiment job in this process; its table.parquet rows."""
    import pyarrow.parquet as pq

    from prism_ray.config import build_config
    from prism_ray.pipelines import classifier, experiment

    config = build_config(experiment.ExperimentConfig, {
        "data": {"manifest": manifest},
        "heads": HEADS,
        "counterfactuals": str(counterfactuals),
        "counterfactuals_limit": limit,
        "samples": None if samples is None else str(samples),
        "samples_labels": {name: labels for name, (_, labels) in SAMPLE_PROMPTS.items()},
        "fixes": ["group_balanced", "group_dro"] if fixes else [],
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "train": {"max_steps": args.train_steps, "batch_size": 32, "eval_every": 25, "patience": None,
                  "log_every": 1000, "checkpoint_every": args.train_steps, "select": "valid_worst_group",
                  "group_heads": list(HEADS)},
        "compute": {"torch_threads": args.threads},
        "evaluation": {"n_boot": 200, "min_group": 3, "primary_head": "pleural_effusion",
                       "primary_attribute": "Support Devices"},
        "output": str(out),
    })
    experiment.run(config, runner=classifier.in_process)
    return pq.read_table(out / "table.parquet").to_pylist()


def pick(table: list[dict], arm: str, metric: str = "worst_group_accuracy", group: str = "worst") -> dict | None:
    """The effusion head's row of `arm` for `metric` (worst-group accuracy over effusion x device by default)."""
    for r in table:
        if (r["arm"] == arm and r["head"] == "pleural_effusion" and r["metric"] == metric
                and (metric != "worst_group_accuracy" or (r["attribute"], r["group"]) == ("Support Devices", group))
                and (metric == "worst_group_accuracy" or (r["attribute"], r["group"]) == ("all", "all"))):
            return r
    return None


def run_audit(args, manifest: str, models: dict[str, str], out: Path) -> dict:
    """The audit job (in-process actors) over the test split with each arm's classifier, heads renamed per arm."""
    from prism_ray.config import build_config
    from prism_ray.pipelines import audit
    from prism_ray.pipelines.augment import in_process

    m = method(args)
    config = build_config(audit.AuditConfig, {
        "model": m["model"], "inversion": m["inversion"], "compute": m["compute"],
        "data": {"manifest": manifest, "adapter": "chexpert", "split": "test"},
        "classifiers": [{"path": path, "heads": {h: f"{h}__{arm}" for h in HEADS}} for arm, path in models.items()],
        "interventions": ["Support Devices=0", "Support Devices=1"],
        "targets": {"Support Devices": f"support_devices__{next(iter(models))}"},
        "implied": {"Support Devices": [f"support_devices__{arm}" for arm in list(models)[1:]]},
        "subgroups": [],
        "max_sources": args.audit_sources,
        "stats": {"bootstrap": 1000},
        "output": str(out),
    })
    return audit.run(config, runner=in_process)


def audit_difference(rows: list[dict], arms: tuple[str, str], intervention: str, n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """Per arm, the effusion head's co-change under `intervention` (decision flips under the edit minus flips
    under the control), and the paired difference arms[0] - arms[1] with a percentile bootstrap CI over images."""
    rows = [r for r in rows if r["intervention"] == intervention]
    out = {"n": len(rows)}
    per_image = {}
    for arm in arms:
        col = f"pleural_effusion__{arm}"
        orig, cf, ctrl = (decision(np.array([r[f"p_{kind}__{col}"] for r in rows], dtype=float))
                          for kind in ("orig", "cf", "ctrl"))
        per_image[arm] = (cf != orig).astype(float) - (ctrl != orig).astype(float)
        out[arm] = {"change_rate": float((cf != orig).mean()) if rows else float("nan"),
                    "control_rate": float((ctrl != orig).mean()) if rows else float("nan")}
    d = per_image[arms[0]] - per_image[arms[1]]
    rng = np.random.default_rng(seed)
    boot = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(n_boot)] if len(d) else [float("nan")]
    out["difference"] = float(d.mean()) if len(d) else float("nan")
    out["ci"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


# --- label quality of the counterfactuals, by the phantom truth ------------------------------------


def _rgb(images: list[np.ndarray]) -> np.ndarray:
    """(N, R, R, 3) uint8 from gray (R, R) images, as the classifiers read them."""
    return np.repeat(np.stack(images)[..., None], 3, axis=-1)


def truth_pair(gt: dict, labels: tuple[int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, true counterfactual) of a ground-truth row rendered at `size`: the same subject with the devices
    the edit's labels say (none, or a tube and ECG leads: "Support Devices" is true of either)."""
    from prism_ray.phantom.dataset import subject_attributes
    from prism_ray.phantom.render import render_phantom

    attrs = subject_attributes(gt)
    wanted = {"devices": frozenset() if labels[1] == 0 else frozenset({"tube", "ecg"})}
    return (render_phantom(attrs, int(gt["seed"]), size),
            render_phantom(attrs.intervene(wanted), int(gt["seed"]), size))


def label_quality(cf_folder: Path, truth_uri: str, judge: str | None) -> dict:
    """Per edit direction, how often an edit's labels are right, by the phantom truth and by a judge.

    Truth (through the family's VAE, so the round trip every edit pays is on both sides): inside the
    subject's effusion region, is the edit closer to its true counterfactual (effusion as labelled)
    than to the same image with the effusion flipped? Inside the device region, is a removal closer to
    its true counterfactual than to its source? (An addition's true device placement is one of many,
    docs/method.md §12: only the judge reads its device.) Judge: a classifier the shortcut cannot fool
    (trained at c = 0.5), on the edits and, for its own error, on the sources' VAE round trips.
    """
    from PIL import Image

    from prism_ray.data.storage import read_table
    from prism_ray.models.classifier import classifier_labels, load_classifier, predict_proba
    from prism_ray.models.loading import load_sd_components
    from prism_ray.phantom.dataset import subject_attributes
    from prism_ray.phantom.render import attribute_mask, render_phantom
    from prism_ray.phantom.truth import vae_round_trip
    from prism_ray.pipelines.experiment import augment_rows

    truth = {r["image_uri"]: r for r in read_table(truth_uri).to_pylist()}
    rows = augment_rows(str(cf_folder)).to_pylist()
    vae = load_sd_components("tiny", device="cpu").vae
    model = load_classifier(judge) if judge else None
    out = {}
    for name, (_, _, labels) in EDITS.items():
        mine = [r for r in rows if r["subgroup"] == name]
        if not mine:
            continue
        cfs = [np.asarray(Image.open(r["image_uri"]).convert("L")) for r in mine]
        size = cfs[0].shape[0]
        refs, regions = [], []
        for r in mine:
            gt = truth[r["source_uri"]]
            attrs, seed = subject_attributes(gt), int(gt["seed"])
            source, true_cf = truth_pair(gt, labels, size)
            flipped = render_phantom(subject_attributes(gt).intervene(
                {"devices": frozenset() if labels[1] == 0 else frozenset({"tube", "ecg"}),
                 "pleural_effusion": not bool(labels[0])}), seed, size)
            refs += [source, true_cf, flipped]
            with_fluid = attrs.intervene({"pleural_effusion": True})
            regions.append((attribute_mask(with_fluid, seed, "pleural_effusion", size),
                            np.logical_or.reduce([attribute_mask(attrs, seed, k, size) for k in ("tube", "ecg")])))
        through = vae_round_trip(vae, refs, size).astype(np.float64)  # (3N, R, R)
        effusion_right, device_right = [], []
        for k, (cf, (fluid, devices)) in enumerate(zip(cfs, regions, strict=True)):
            cf = cf.astype(np.float64)
            src, true_cf, flipped = through[3 * k], through[3 * k + 1], through[3 * k + 2]
            if fluid.any():
                effusion_right.append(np.abs(cf - true_cf)[fluid].mean() < np.abs(cf - flipped)[fluid].mean())
            if labels[1] == 0 and devices.any():
                device_right.append(np.abs(cf - true_cf)[devices].mean() < np.abs(cf - src)[devices].mean())
        entry = {"n": len(mine), "truth_effusion_as_labelled": float(np.mean(effusion_right))}
        if device_right:
            entry["truth_device_removed"] = float(np.mean(device_right))
        if model is not None:
            names = classifier_labels(model)
            p = predict_proba(model, _rgb(cfs))
            p_src = predict_proba(model, _rgb(list(through[0::3].astype(np.uint8))))
            e, d = names.index("pleural_effusion"), names.index("support_devices")
            entry["judge_effusion_as_labelled"] = float(np.mean(decision(p[:, e]) == bool(labels[0])))
            entry["judge_device_as_labelled"] = float(np.mean(decision(p[:, d]) == bool(labels[1])))
            entry["judge_effusion_right_on_source_round_trip"] = float(np.mean(decision(p_src[:, e]) == bool(labels[0])))
        out[name] = entry
    return out


# --- the report --------------------------------------------------------------------------------


def write_report(out: Path, result: dict, examples: list[tuple[str, list[np.ndarray]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prism_ray.report.html import HtmlReport

    report = HtmlReport("Shortcut: expose, fix, verify (phantoms with ground truth)")
    report.add_paragraph(result["verdict"], id="verdict")
    sweep = result["sweep"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arm, label in ARM_LABELS.items():
        pts = [(c, s[arm]) for c, s in sorted(sweep.items(), key=lambda kv: float(kv[0])) if s.get(arm)]
        if not pts:
            continue
        xs = [float(c) for c, _ in pts]
        ax.errorbar(xs, [v["mean"] for _, v in pts],
                    yerr=[[v["mean"] - v["ci_low"] for _, v in pts], [v["ci_high"] - v["mean"] for _, v in pts]],
                    marker="o", capsize=3, label=label)
    ax.set_xlabel("train correlation c = P(device | effusion) = P(no device | no effusion)")
    ax.set_ylabel("effusion worst-group accuracy (test)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    report.add_figure(fig, caption="Worst-group accuracy of the effusion head over effusion x device on the "
                      "independent test split, mean over seeds with 95 % t-intervals.", id="sweep")
    plt.close(fig)
    curve = result["learning_curve"]
    if curve:
        fig, ax = plt.subplots(figsize=(5.6, 3.6))
        ks = sorted(int(k) for k in curve)
        ax.errorbar(ks, [curve[str(k)]["mean"] for k in ks],
                    yerr=[[curve[str(k)]["mean"] - curve[str(k)]["ci_low"] for k in ks],
                          [curve[str(k)]["ci_high"] - curve[str(k)]["mean"] for k in ks]], marker="o", capsize=3)
        ax.axhline(result["main_original"]["mean"], color="grey", ls="--", label="(a) original")
        ax.set_xscale("log")
        ax.set_xlabel("counterfactuals per direction")
        ax.set_ylabel("worst-group accuracy")
        ax.legend(fontsize=8)
        report.add_figure(fig, caption=f"Arm (c) at c = {result['main']} against the number of counterfactuals.",
                          id="curve")
        plt.close(fig)
    report.add_table(columns=["arm", "worst-group acc", "diff to (a) [95 % CI]", "p (sign-flip)", "mean acc"],
                     rows=result["main_table"], caption=f"At c = {result['main']} ({result['seeds']} seeds)", id="main")
    report.add_table(columns=["intervention", "arm", "n", "effusion change rate", "control rate", "flagged", "q"],
                     rows=result["audit_table"], caption="The audit of the (a) and (c) classifiers", id="audit")
    report.add_key_values({k: json.dumps(v) for k, v in result["label_quality"].items()}, id="labels")
    if examples:
        report.add_image_grid(examples, ["source", "counterfactual", "true counterfactual"],
                              caption="Accepted counterfactuals of the c = 1 train split", id="examples")
    return report.write(str(out / "report.html"))


def examples_of(cf_folder: Path, truth_uri: str, k: int = 4) -> list[tuple[str, list[np.ndarray]]]:
    from PIL import Image

    from prism_ray.data.storage import read_table
    from prism_ray.pipelines.experiment import augment_rows

    truth = {r["image_uri"]: r for r in read_table(truth_uri).to_pylist()}
    rows = augment_rows(str(cf_folder)).to_pylist()
    out = []
    for name, (_, _, labels) in EDITS.items():
        for r in [r for r in rows if r["subgroup"] == name][:k]:
            cf = np.asarray(Image.open(r["image_uri"]).convert("L"))
            source, true_cf = truth_pair(truth[r["source_uri"]], labels, cf.shape[0])
            out.append((f"{name}: {Path(r['source_uri']).stem}", [source, cf, true_cf]))
    return out


# --- the whole benchmark ---------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from prism_ray.console import configure_logging
    from prism_ray.phantom.dataset import write_phantom_dataset

    configure_logging()  # the jobs' own lines (progress every 10 s) between this script's [shortcut] lines
    out = Path(args.out).resolve()
    t0, seconds = time.perf_counter(), {}

    def say(text: str) -> None:
        print(f"[shortcut {time.perf_counter() - t0:5.0f}s] {text}", flush=True)

    data = {c: write_phantom_dataset(str(out / "data" / f"c{c:g}"), dataset_config(args, c)) for c in
            sorted({*args.correlations, 1.0})}
    seconds["data"] = time.perf_counter() - t0
    say(f"{len(data)} datasets of {args.subjects} phantoms (c = {sorted(data)})")

    t = time.perf_counter()
    cf_folder = out / "counterfactuals"
    cf_summary = make_counterfactuals(args, data[1.0].manifest_uri, cf_folder)
    seconds["counterfactuals"] = time.perf_counter() - t
    say(f"counterfactuals: { {n: s.get('accepted') for n, s in cf_summary['subgroups'].items()} } accepted "
        f"({seconds['counterfactuals']:.0f}s)")
    t = time.perf_counter()
    samples = out / "samples"
    make_samples(args, samples)
    seconds["samples"] = time.perf_counter() - t
    say(f"samples written ({seconds['samples']:.0f}s)")

    sweep, tables, eligible = {}, {}, {}
    for c in args.correlations:
        t = time.perf_counter()
        folder = out / "cf_sets" / f"c{c:g}"
        eligible[c] = counterfactuals_for(cf_folder, data[1.0].manifest_uri, data[c].manifest_uri, folder)
        tables[c] = run_experiment(args, data[c].manifest_uri, out / "experiments" / f"c{c:g}",
                                   counterfactuals=folder, samples=samples, limit=args.per_direction, fixes=True)
        sweep[str(c)] = {arm: pick(tables[c], arm) for arm in ARM_LABELS}
        seconds[f"experiment_c{c:g}"] = time.perf_counter() - t
        say(f"c = {c:g}: worst-group " + ", ".join(
            f"{arm} {v['mean']:.2f}" for arm, v in sweep[str(c)].items() if v) + f" ({seconds[f'experiment_c{c:g}']:.0f}s)")

    curve = {}
    t = time.perf_counter()
    folder = out / "cf_sets" / f"c{args.main:g}"
    for k in args.curve:
        table = (tables[args.main] if k == args.per_direction else
                 run_experiment(args, data[args.main].manifest_uri, out / "curve" / f"k{k}",
                                counterfactuals=folder, samples=None, limit=k, fixes=False))
        curve[str(k)] = pick(table, "counterfactuals")
    seconds["learning_curve"] = time.perf_counter() - t
    say("learning curve: " + ", ".join(f"{k}: {v['mean']:.2f}" for k, v in curve.items() if v))

    t = time.perf_counter()
    runs = out / "experiments" / f"c{args.main:g}" / "runs"
    models = {arm: str(runs / f"{arm}-seed{args.first_seed}" / "model") for arm in ("original", "counterfactuals")}
    audit_summary = run_audit(args, data[args.main].manifest_uri, models, out / "audit")
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "audit" / "rows.parquet").to_pylist()
    cochange = pq.read_table(out / "audit" / "cochange.parquet").to_pylist()
    audit = {spec: audit_difference(rows, ("original", "counterfactuals"), spec)
             for spec in ("Support Devices=0", "Support Devices=1")}
    seconds["audit"] = time.perf_counter() - t
    say(f"audit: {audit_summary['rows']} rows ({seconds['audit']:.0f}s)")

    judge = str(out / "experiments" / f"c{min(args.correlations):g}" / "runs" / f"original-seed{args.first_seed}" / "model")
    quality = label_quality(cf_folder, data[1.0].ground_truth_uri, judge if min(args.correlations) == 0.5 else None)
    seconds["total"] = time.perf_counter() - t0

    main_rows, main_table = tables[args.main], []
    for arm, label in ARM_LABELS.items():
        r, acc = pick(main_rows, arm), pick(main_rows, arm, "accuracy")
        if r is None:
            continue
        diff = "" if r.get("diff") is None else f"{r['diff']:+.3f} [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]"
        p = "" if r.get("p_sign_flip") is None else f"{r['p_sign_flip']:.3f}"
        main_table.append([label, f"{r['mean']:.3f} ± {r['sd']:.3f}", diff, p, "" if acc is None else f"{acc['mean']:.3f}"])
    audit_table = []
    for r in cochange:
        if r["attribute"].startswith("pleural_effusion__") and r["subgroup"] in ("all", None, ""):
            audit_table.append([r["intervention"], r["attribute"].split("__")[1], r["n"], f"{r['change_rate']:.2f}",
                                f"{r['control_rate']:.2f}", bool(r["flagged"]), f"{r['q_value']:.2g}"])
    a, c_arm = pick(main_rows, "original"), pick(main_rows, "counterfactuals")
    b = pick(main_rows, "sd_samples")
    acc_a = pick(main_rows, "original", "accuracy")
    verdict = (
        f"At train correlation {args.main:g}, the original classifier's effusion worst-group accuracy is "
        f"{a['mean']:.2f} against {acc_a['mean']:.2f} mean accuracy ({args.seeds} seeds): "
        f"{'the shortcut is taken' if acc_a['mean'] - a['mean'] >= 0.15 else 'the shortcut is not clearly taken'}. "
        f"Counterfactuals change it by {c_arm['diff']:+.2f} (95 % CI {c_arm['diff_ci_low']:+.2f} to "
        f"{c_arm['diff_ci_high']:+.2f}); text-to-image samples by {b['diff']:+.2f} "
        f"({b['diff_ci_low']:+.2f} to {b['diff_ci_high']:+.2f})."
    ) if a and c_arm and b and acc_a and c_arm.get("diff") is not None and b.get("diff") is not None else "incomplete run"
    result = {
        "args": vars(args), "seconds": seconds, "main": args.main, "seeds": args.seeds, "verdict": verdict,
        "sweep": sweep, "learning_curve": curve, "main_original": a, "main_table": main_table,
        "eligible_counterfactuals": {str(c): n for c, n in eligible.items()},
        "counterfactual_summary": cf_summary.get("subgroups"), "audit": audit, "audit_table": audit_table,
        "label_quality": quality,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    report = write_report(out, result, examples_of(cf_folder, data[1.0].ground_truth_uri))
    say(verdict)
    say(f"audit: {json.dumps(audit)}")
    say(f"report {report}; result {out / 'result.json'}")
    return result


if __name__ == "__main__":
    main()
