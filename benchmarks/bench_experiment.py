"""Does counterfactual augmentation fix the phantom shortcut where SD samples do not? The whole loop, on CPU.

The phantom dataset plants a shortcut: in its train split tubes / ECG leads follow pleural effusion
(P = 0.8 with effusion, 0.1 without); in valid / test they are independent. A classifier that reads
devices as effusion fails on "device, no effusion" and "effusion, no device" test images. Loop:

1. write the phantom dataset;
2. no fine-tuning: the shipped tiny family (`prism_ray/phantom/assets/tiny_phantom`) was trained on
   phantoms from the same renderer, so a fine-tune on these few hundred more adds nothing here;
3. augment (counterfactual mode): do(Support Devices=0) on effusion-positive train images with devices,
   do(Support Devices=1) on effusion-negative ones without (the edits that break the shortcut);
4. augment (mode: samples): text-to-image samples of the same edit captions, as many of each;
5. experiment: arms original / + SD samples / + counterfactuals, same step budget, seeds 0..k-1,
   scored on the shortcut-free test split.

    python benchmarks/bench_experiment.py --out outputs/bench_experiment
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench_experiment")
    p.add_argument("--subjects", type=int, default=1200)
    p.add_argument(
        "--per-direction", type=int, default=32, help="accepted counterfactuals per edit direction"
    )
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of inversion, edit and samples")
    p.add_argument("--inner", type=int, default=2, help="null-text inner steps")
    p.add_argument("--train-steps", type=int, default=300, help="optimiser steps per classifier (every arm)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--reuse-augment",
        action="store_true",
        help="use the augment outputs already under --out (steps 3-4 skipped)",
    )
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from prism_ray.config import build_config
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
    from prism_ray.pipelines import augment, classifier, experiment
    from prism_ray.results.augmentation import augment_rows

    out = Path(args.out).resolve()
    t0, seconds = time.perf_counter(), {}
    data = write_phantom_dataset(str(out / "data"), PhantomDatasetConfig(n_subjects=args.subjects, seed=14))
    seconds["phantom"] = time.perf_counter() - t0
    common = {
        "model": {"path": "tiny", "device": "cpu"},
        "inversion": {
            "num_inference_steps": args.steps,
            "num_inner_steps": args.inner,
            "learning_rate": 0.05,
        },
        "edit": {"local_blend": True, "blend_mask": "noise"},
        "compute": {"batch_size": 4, "torch_threads": args.threads},
        "planner": {"initial_acceptance": 0.9},  # the tiny family's edits pass S_CLIP almost always
    }
    n = args.per_direction
    cf = build_config(
        augment.AugmentConfig,
        {
            **common,
            "data": {"manifest": data.manifest_uri, "split": "train"},
            "subgroups": [
                {
                    "name": "remove_devices",
                    "selector": {"Pleural Effusion": 1, "Support Devices": 1},
                    "interventions": ["Support Devices=0"],
                    "quota": n,
                },
                {
                    "name": "add_devices",
                    "selector": {"Pleural Effusion": 0, "Support Devices": 0},
                    "interventions": ["Support Devices=1"],
                    "quota": n,
                },
            ],
            "output": str(out / "counterfactuals"),
        },
    )
    t = time.perf_counter()
    cf_summary = (
        allow_shortfall(augment.run, cf) if not args.reuse_augment else _summary(out / "counterfactuals")
    )
    seconds["augment_counterfactuals"] = time.perf_counter() - t
    accepted = augment_rows(str(out / "counterfactuals")).column("edit_prompt").to_pylist()
    prompts = Counter(accepted)
    samples = build_config(
        augment.AugmentConfig,
        {
            **common,
            "mode": "samples",
            "sampling": {"num_inference_steps": args.steps, "batch_size": 8},
            "subgroups": [
                {"name": f"caption{i}", "prompt": text, "quota": k}
                for i, (text, k) in enumerate(sorted(prompts.items()))
            ],
            "output": str(out / "samples"),
        },
    )
    t = time.perf_counter()
    if not args.reuse_augment:
        allow_shortfall(augment.run, samples)
    seconds["augment_samples"] = time.perf_counter() - t

    config = build_config(
        experiment.ExperimentConfig,
        {
            "data": {"manifest": data.manifest_uri},
            "heads": {"pleural_effusion": "Pleural Effusion", "support_devices": "Support Devices"},
            "counterfactuals": str(out / "counterfactuals"),
            "samples": str(out / "samples"),
            "seeds": args.seeds,
            "train": {
                "max_steps": args.train_steps,
                "batch_size": 32,
                "eval_every": 25,
                "patience": 4,
                "log_every": 100,
                "checkpoint_every": args.train_steps,
            },
            "compute": {"torch_threads": args.threads},
            "evaluation": {"subgroups": ["Sex"], "age_column": "Age", "n_boot": 200, "min_group": 5},
            "output": str(out / "experiment"),
        },
    )
    t = time.perf_counter()
    summary = experiment.run(config, runner=classifier.in_process)
    seconds["experiment"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    import pyarrow.parquet as pq

    table = pq.read_table(out / "experiment" / "table.parquet").to_pylist()
    wanted = [  # (name, attribute, group, label, metric) of the effusion head
        ("effusion accuracy (test)", "all", "all", None, "accuracy"),
        ("effusion AUROC (test)", "all", "all", None, "auroc"),
        ("device, no effusion", "Support Devices", "1", 0, "accuracy"),
        ("effusion, no device", "Support Devices", "0", 1, "accuracy"),
        ("worst group (effusion x device)", "Support Devices", "worst", None, "worst_group_accuracy"),
    ]
    lines = [
        "| metric | arm | mean ± sd over seeds | diff to (a) [95% CI] | p (paired t) | p (sign-flip) |",
        "|---|---|---|---|---|---|",
    ]
    for name, *key in wanted:
        for r in table:
            if (
                r["head"] != "pleural_effusion"
                or [r["attribute"], r["group"], r["label"], r["metric"]] != key
            ):
                continue
            diff = p_t = p_s = ""
            if r.get("diff") is not None:
                diff = f"{r['diff']:+.3f} [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]"
                p_t, p_s = f"{r['p_paired_t']:.3f}", f"{r['p_sign_flip']:.3f}"
            lines.append(
                f"| {name} | {r['arm']} | {r['mean']:.3f} ± {r['sd']:.3f} | {diff} | {p_t} | {p_s} |"
            )
    result = {
        "seconds": seconds,
        "arms": summary["arms"],
        "test_rows": summary["test_rows"],
        "counterfactuals": cf_summary.get("subgroups"),
        "sample_prompts": dict(prompts),
        "runs": summary["runs"],
    }
    (out / "bench_result.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n".join(lines))
    print(json.dumps({"seconds": seconds, "arms": summary["arms"]}, indent=1))


def _summary(folder: Path) -> dict:
    return json.loads((folder / "run_summary.json").read_text())


def allow_shortfall(run, config) -> dict:
    """An augment run; a quota shortfall is reported and the rows it has are used."""
    from prism_ray.pipelines.augment import in_process
    from prism_ray.results.summary import RunIncomplete

    try:
        return run(config, runner=in_process)
    except RunIncomplete as err:
        print(f"(shortfall) {err}")
        return err.summary


if __name__ == "__main__":
    main()
