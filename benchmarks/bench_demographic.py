"""Demographic-family probe: do the biased and control fine-tunes carry (or not) the planted relationships?

Builds the two variants if their folders are missing (`prism_ray.phantom.demographic`; the biased one
trains the classifier, the control reuses it), then edits held-out phantoms with each (null-text
inversion, 20 steps, lr 0.05, prompt-to-prompt Refine + Reweight without local blend) and counts how
often the classifier's heads change from the original image:

  * do(Cardiomegaly=0) on subjects with cardiomegaly and a pacemaker: the pacemaker head turning off
    is the learnt relationship (captions only ever said "Support Devices");
  * do(age=+20) and do(age=80) on young subjects without effusion: the effusion head turning on.

Each count is shown beside the same count for the unedited reconstruction (the edit pipeline's own
drift), with a one-sided Fisher exact p-value of biased > control. Writes `results.json` and `results.md`.

    python benchmarks/bench_demographic.py --work /tmp/demographic            # build if needed, probe 24 + 24
    python benchmarks/bench_demographic.py --work DIR --n 8 --steps 10        # a quick look
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prism_ray.phantom.demographic import DemographicFamilyConfig, build_variant, fisher_greater, probe_family

# (probe edit, head, direction): the planted relationships, then the targets and the drift heads.
READOUTS = [
    ("cardiomegaly_pacemaker: do(Cardiomegaly=0)", "pacemaker", "turned_off"),
    ("cardiomegaly_pacemaker: do(Cardiomegaly=0)", "cardiomegaly", "turned_off"),
    ("cardiomegaly_pacemaker: do(Cardiomegaly=0)", "support_devices", "turned_off"),
    ("cardiomegaly_pacemaker: do(Cardiomegaly=0)", "pleural_effusion", "turned_on"),
    ("cardiomegaly_pacemaker: do(Cardiomegaly=0)", "sex_female", "turned_on"),
    ("young_no_effusion: do(age=+20)", "pleural_effusion", "turned_on"),
    ("young_no_effusion: do(age=+20)", "age_ge_40", "turned_on"),
    ("young_no_effusion: do(age=80)", "pleural_effusion", "turned_on"),
    ("young_no_effusion: do(age=80)", "age_ge_60", "turned_on"),
    ("young_no_effusion: do(age=80)", "age_ge_80", "turned_on"),
    ("young_no_effusion: do(age=80)", "cardiomegaly", "turned_on"),
]


def build(work: Path, seed: int, threads: int) -> None:
    for variant in ("biased", "control"):
        out = work / variant
        if (out / "model_index.json").exists():
            continue
        classifier = None if variant == "biased" else str(work / "biased")
        build_variant(
            DemographicFamilyConfig(
                variant=variant, out=str(out), seed=seed, threads=threads, classifier=classifier
            )
        )


def summarize(results: dict, n: int, steps: int) -> tuple[list[dict], list[str]]:
    """The readout table (rows of counts + Fisher p-values) and its markdown lines."""
    lines = [
        f"# Demographic family probe ({n} held-out phantoms per set, {steps} NTI steps, no local blend)",
        "",
        "| edit | head | biased: edit / recon | control: edit / recon | Fisher p (biased > control) |",
        "|---|---|---|---|---|",
    ]
    table = []
    for edit, head, direction in READOUTS:
        row = {"edit": edit, "head": head, "direction": direction}
        for variant in ("biased", "control"):
            r = results[variant][edit]
            row[variant] = r["edited"][direction][head]
            row[f"{variant}_control"] = r["control"][direction][head]
            row["n"] = r["n"]
        row["fisher_p"] = fisher_greater(row["biased"], row["n"], row["control"], row["n"])
        table.append(row)
        word = "off" if direction == "turned_off" else "on"
        lines.append(
            f"| {edit} | {head} {word} | {row['biased']}/{row['n']} / {row['biased_control']}/{row['n']} | "
            f"{row['control']}/{row['n']} / {row['control_control']}/{row['n']} | {row['fisher_p']:.2g} |"
        )
    for edit in results["biased"]:
        ups = {v: results[v][edit]["edited"].get("age_bin_up") for v in ("biased", "control")}
        lines.append(
            f"\nage bin read from the heads went up, {edit}: biased {ups['biased']}, control {ups['control']}"
        )
    return table, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder holding (or receiving) biased/ and control/")
    parser.add_argument("--classifier", default=None, help="classifier folder (default: the biased family's)")
    parser.add_argument("--n", type=int, default=24, help="held-out phantoms per probe set")
    parser.add_argument("--steps", type=int, default=20, help="DDIM / null-text inversion steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    t0 = time.perf_counter()
    build(work, args.seed, args.threads)
    classifier = args.classifier or str(work / "biased")
    results, seconds = {}, {}
    for variant in ("biased", "control"):
        tic = time.perf_counter()
        results[variant] = probe_family(
            work / variant, classifier, n=args.n, seed=args.seed, num_inference_steps=args.steps
        )
        seconds[variant] = time.perf_counter() - tic
        print(f"[probe] {variant}: {seconds[variant]:.0f}s", flush=True)

    table, lines = summarize(results, args.n, args.steps)
    lines.append(
        f"\nRuntime: {time.perf_counter() - t0:.0f}s (probe: "
        + ", ".join(f"{v} {t:.0f}s" for v, t in seconds.items())
        + ")"
    )
    (work / "results.json").write_text(
        json.dumps({"table": table, "raw": results, "seconds": seconds}, indent=2)
    )
    (work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
