"""Does the audit find relationships a model learnt and the labels hide, and only those? (ground truth)

Two U-Nets fine-tuned from the same base on MIMIC-style phantom captions (`phantom.demographic`):
**biased** — pacemakers follow cardiomegaly (the captions say only "Support Devices") and older
subjects have more pleural effusion; **control** — the same recipe with independent attributes.
Held-out phantoms (every attribute independent, split into disjoint subsets) are audited with
both models with do(Cardiomegaly=0) and do(age=+20). The audit should flag
do(Cardiomegaly=0) → pacemaker and do(age=+20) → pleural effusion with the biased model in every
subset, and neither with the control model.

    python benchmarks/bench_audit.py --out outputs/bench_audit --subsets 3 --n 100 --steps 20 --inner 5 \
        --blend-threshold 0.3                                             # the BENCHMARKS.md run
    python benchmarks/bench_audit.py --out /tmp/bench_audit --smoke       # minutes: plumbing only

Families are built once under `<out>/families/` and reused (about 10 minutes each on 2 CPU cores: the
biased one teaches the text tower the MIMIC caption words and trains the classifier, the control reuses both).
Writes `<out>/<arm>/results.json`, `<out>/<arm>/results.md` (the BENCHMARKS.md table) and each audit's
output folder (report.html) under `<out>/<arm>/<variant>/subset<k>/`; `<arm>` is `no_blend`, or
`noise_blend_<t>` with `--blend-threshold t` (the noise-difference blend at a loose threshold).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

PLANTED = [("Cardiomegaly=0", "pacemaker"), ("age=+20", "pleural_effusion")]


def build_family(out: Path, variant: str, threads: int, shared: Path | None) -> Path:
    """The variant's family folder (built once; reused when it is complete). `shared`: a variant built before,
    whose classifier (one judge for both models) and adapted text tower (one text encoder) this one reuses."""
    from prism_ray.phantom.demographic import DemographicFamilyConfig, build_variant

    folder = out / "families" / variant
    metrics = folder / "metrics.json"
    if (folder / "classifier" / "config.json").exists() and metrics.exists():
        if json.loads(metrics.read_text()).get("text_vocabulary"):  # built with the adapted text tower
            return folder
    config = DemographicFamilyConfig(variant=variant, out=str(folder), threads=threads,
                                     classifier=str(shared) if shared else None,
                                     text_from=str(shared) if shared else None)
    build_variant(config)
    return folder


def held_out(out: Path, n: int, subsets: int, seed: int) -> list[str]:
    """`subsets` disjoint manifests of `n` held-out phantoms each: every attribute independent, ages 20-89."""
    from prism_ray.phantom.dataset import PhantomDatasetConfig, SplitFractions, write_phantom_dataset

    root = out / "heldout"
    manifests = [root / f"subset{k}.parquet" for k in range(subsets)]
    if all(m.exists() for m in manifests):
        return [str(m) for m in manifests]
    config = PhantomDatasetConfig(
        n_subjects=n * subsets, seed=seed, split_fractions=SplitFractions(train=0.0, valid=0.0, test=1.0),
        p_cardiomegaly=0.5, p_effusion=0.25, p_female=0.5, age_min=20, age_max=89,
        p_pacemaker_given_cardiomegaly=0.5, p_pacemaker_given_no_cardiomegaly=0.5, p_other_device=0.3,
        p_other_device_given_effusion_train=0.3, p_other_device_given_no_effusion_train=0.3,
    )
    summary = write_phantom_dataset(str(root), config)
    table = pq.read_table(summary.manifest_uri)
    for k, path in enumerate(manifests):
        pq.write_table(table.slice(k * n, n), path)
    return [str(m) for m in manifests]


def audit_config(family: Path, manifest: str, output: Path, steps: int, inner: int, bootstrap: int,
                 method: str = "null_text", blend_threshold: float | None = None):
    from prism_ray.config import build_config
    from prism_ray.phantom.dataset import mimic_adapter_options
    from prism_ray.phantom.demographic import age_heads
    from prism_ray.pipelines.audit import AuditConfig

    ages = list(age_heads())
    return build_config(AuditConfig, {
        "model": {"path": str(family), "device": "cpu"},
        "data": {"manifest": manifest, "adapter": "mimic", "adapter_options": mimic_adapter_options()},
        "classifiers": [{"path": str(family)}],
        "interventions": ["Cardiomegaly=0", "age=+20"],
        # do(age=+20) moves one bin: it turns exactly one age head on, which one depends on the image.
        "targets": {"Cardiomegaly": "cardiomegaly", "age": ages[0]},
        "implied": {"age": ages[1:]},
        "subgroups": ["sex", "age"],
        "inversion": {"method": method, "num_inference_steps": steps, "num_inner_steps": inner,
                      "learning_rate": 0.05, "batch_size": 8},
        "edit": edit_settings(blend_threshold),
        "stats": {"bootstrap": bootstrap},
        "compute": {"batch_size": 8},
        "output": str(output),
    })


def edit_settings(blend_threshold: float | None) -> dict:
    """No local blend, or the noise-difference blend at a loose threshold."""
    if blend_threshold is None:
        return {"local_blend": False, "edit_batch_size": 8}
    return {"local_blend": True, "blend_mask": "noise", "noise_mask_threshold": blend_threshold, "edit_batch_size": 8}


def arm_name(blend_threshold: float | None) -> str:
    return "no_blend" if blend_threshold is None else f"noise_blend_{blend_threshold:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench_audit")
    parser.add_argument("--subsets", type=int, default=3)
    parser.add_argument("--n", type=int, default=100, help="held-out phantoms per subset")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--method", default="null_text", choices=["null_text", "direct", "ddim"],
                        help="inversion: null_text (reference), direct (exact, no optimisation: ~5x cheaper)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--blend-threshold", type=float, default=None,
                        help="edit with the noise-difference blend at this threshold (default: no blend)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing, not the claim")
    args = parser.parse_args(argv)
    if args.smoke:
        args.subsets, args.n, args.steps, args.inner, args.bootstrap = 1, 12, 4, 2, 100
    import torch

    from prism_ray.pipelines import audit
    from prism_ray.pipelines.augment import in_process

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    families = {}
    for variant in ("biased", "control"):
        t = time.perf_counter()
        families[variant] = build_family(out, variant, args.threads, families.get("biased"))
        print(f"[family] {variant}: {families[variant]} ({time.perf_counter() - t:.0f}s)", flush=True)
    manifests = held_out(out, args.n, args.subsets, args.seed)
    results = []
    for variant, family in families.items():
        for k, manifest in enumerate(manifests):
            output = out / arm_name(args.blend_threshold) / variant / f"subset{k}"
            config = audit_config(family, manifest, output, args.steps, args.inner, args.bootstrap, args.method,
                                  args.blend_threshold)
            t = time.perf_counter()
            summary = audit.run(config, runner=lambda f, c, o: in_process(f, c, o))
            seconds = time.perf_counter() - t
            cochange = pq.read_table(output / "cochange.parquet")
            cochange = cochange.filter(pc.equal(cochange.column("subgroup"), "all")).to_pylist()
            cells = {(r["intervention"], r["attribute"]): r for r in cochange}
            per = pq.read_table(output / "interventions.parquet")
            per = {r["intervention"]: r for r in per.to_pylist() if r["subgroup"] == "all"}
            row = {"variant": variant, "subset": k, "rows": summary["rows"], "errors": summary["error_rows"],
                   "seconds": seconds, "sources": summary["accounting"]["tasks"],
                   "flagged": [[f["intervention"], f["attribute"]] for f in summary["flagged"]]}
            for intervention, attribute in PLANTED:
                c = cells[(intervention, attribute)]
                row[f"{intervention}->{attribute}"] = {k2: c[k2] for k2 in (
                    "n", "change_rate", "control_rate", "difference", "ci_low", "ci_high", "q_value", "flagged")}
            for intervention, r in per.items():
                target = cells[(intervention, r["target"])]
                row[f"{intervention} target"] = {"target": r["target"], "cpg": r["target_cpg"],
                                                 "control_cpg": r["control_target_cpg"],
                                                 "flip_rate": target["change_rate"],
                                                 "control_flip_rate": target["control_rate"],
                                                 "acceptance": r["acceptance_rate"]}
            results.append(row)
            print(json.dumps(row, default=float), flush=True)
    total = time.perf_counter() - t0
    arm = out / arm_name(args.blend_threshold)
    (arm / "results.json").write_text(json.dumps({"args": vars(args), "results": results, "seconds": total},
                                                 indent=2, default=float))
    (arm / "results.md").write_text(markdown(results, args, total))
    print(markdown(results, args, total))
    return 0


def markdown(results: list[dict], args, total: float) -> str:
    lines = [
        f"Held-out phantoms: {args.subsets} disjoint subsets × {args.n}; {args.method} inversion, {args.steps} steps"
        + (f" ({args.inner} inner, lr 0.05)" if args.method == "null_text" else "")
        + (", prompt-to-prompt without local blend" if args.blend_threshold is None
           else f", prompt-to-prompt with the noise-difference blend at threshold {args.blend_threshold:g}")
        + f"; {args.bootstrap} bootstrap "
        f"replicates; total {total / 60:.0f} min.",
        "",
        "| model | subset | cell | n | change | control | difference [95 % CI] | q | flagged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for intervention, attribute in PLANTED:
            c = r[f"{intervention}->{attribute}"]
            lines.append(
                f"| {r['variant']} | {r['subset']} | do({intervention}) → {attribute} | {c['n']} | "
                f"{c['change_rate']:.0%} | {c['control_rate']:.0%} | {c['difference']:+.2f} "
                f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {c['q_value']:.1g} | {'**yes**' if c['flagged'] else 'no'} |")
    lines += ["", "| model | subset | intervention | target | flip rate (control) | target CPG (control) | "
              "S_CLIP acceptance | other flagged | s/source |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        planted = {tuple(p) for p in PLANTED}
        other = list(dict.fromkeys(f"{i}→{a}" for i, a in r["flagged"] if (i, a) not in planted))
        for key, t in r.items():
            if key.endswith(" target"):
                lines.append(
                    f"| {r['variant']} | {r['subset']} | do({key[:-7]}) | {t['target']} | {t['flip_rate']:.0%} "
                    f"({t['control_flip_rate']:.0%}) | {t['cpg']:.2f} ({t['control_cpg']:.2f}) | "
                    f"{t['acceptance']:.0%} | {', '.join(other) or '—'} | {r['seconds'] / max(r['sources'], 1):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
