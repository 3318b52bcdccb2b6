"""Augment-job throughput with 1 and 2 CPU actors (local Ray, tiny family), plus a GPU capacity estimate.

    python benchmarks/bench_augment.py                          # 1 and 2 actors, prints JSON
    python benchmarks/bench_augment.py --actors 1 2 --attempts 24 --steps 4 --inner 2

The capacity estimate answers "how many GPU-hours for 4 subgroups x 2,500 accepted at SD1.5/512":

    attempts    = subgroups * quota / acceptance  (the kept prefix; surplus adds at most over_provision - 1)
    per attempt = t_invert + t_edit               (one intervention per subgroup: 1 inversion, 1 edit)
    GPU-hours = attempts * per_attempt / 3600 + actors * model_load / 3600   (the pool lives for the job)

t_invert + K * t_edit comes from `--gpu-seconds-per-source` (seconds for null-text inversion + K edits
of one 512^2 source on one GPU, from benchmarks/bench_engine.py --sd15-shaped on the GPU; default: the
DESIGN target, 4 s for K = 4) split by counting U-Net evaluations of each stage for the configured
steps. Acceptance on the random tiny family is arbitrary, so the estimate is given for a range.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def unet_evaluations(steps: int, inner_steps: float, edits: int) -> tuple[float, float]:
    """(inversion, per-edit) U-Net forward-equivalents; a backward pass counts as two forwards.

    Inversion: DDIM inversion (1 per step) + null-text optimisation per step: one conditional
    forward, `inner_steps` x (unconditional forward + backward), one guided step (2 forwards).
    Editing: per step, classifier-free guidance on [uncond; cond] for each of the 1 + K branches;
    the source branch is shared by the K edits, so each edit costs 2 forwards per step plus its
    share of the source branch.
    """
    inversion = steps * (1 + 1 + 3 * inner_steps + 2)
    per_edit = steps * 2 * (1 + 1 / edits)
    return inversion, per_edit


def capacity(args, acceptance: float) -> dict:
    inv, edit = unet_evaluations(50, args.gpu_inner_steps, args.gpu_edits)
    per_eval = args.gpu_seconds_per_source / (inv + args.gpu_edits * edit)
    t_invert, t_edit = inv * per_eval, edit * per_eval
    accepted = args.subgroups * 2500
    attempts = accepted / acceptance
    worst_surplus = attempts * (args.over_provision - 1)  # at most one over-provisioned round is wasted
    per_attempt = t_invert + t_edit
    work_s = attempts * per_attempt
    overhead_s = args.gpu_actors * args.model_load_seconds  # models load once per actor per job
    return {
        "acceptance": acceptance,
        "attempts": round(attempts),
        "gpu_seconds_per_attempt": round(t_invert + t_edit, 3),
        "gpu_hours": round((work_s + overhead_s) / 3600, 2),
        "gpu_hours_worst_case_surplus": round((work_s + worst_surplus * per_attempt + overhead_s) / 3600, 2),
        "wall_hours_on_8_gpus": round((work_s + overhead_s) / 3600 / 8, 2),
    }


def _rounded(values: dict) -> dict:
    return {k: round(v, 3) for k, v in values.items()}


def make_data(root: Path, n: int) -> str:
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset

    config = PhantomDatasetConfig(n_subjects=n, resolution=64, seed=3)
    return write_phantom_dataset(str(root / "data"), config).manifest_uri


def run(args, family: str, manifest: str, actors: int, out: str) -> dict:
    from prism_ray.distributed.rounds import ray_runner
    from prism_ray.pipelines.augment import AugmentConfig
    from prism_ray.pipelines.augment import run as augment

    # Rounds of a fixed size (accept everything, no over-provisioning): throughput, not quota luck.
    config = AugmentConfig.model_validate(
        {
            "model": {"path": family, "device": "cpu"},
            "data": {"manifest": manifest},
            "subgroups": [
                # Phantoms never carry a fracture label: this edit changes every caption (no no-op slots).
                {"name": "all", "interventions": ["Fracture=1"], "quota": args.attempts},
            ],
            "inversion": {"num_inference_steps": args.steps, "num_inner_steps": args.inner},
            "filter": {"s_clip_min": -1.0},
            "planner": {"initial_acceptance": 1.0, "over_provision": 1.0, "max_rounds": 20,
                        "max_attempts_per_round": args.per_round or args.attempts},
            "output": out,
            "compute": {"num_actors": actors, "batch_size": args.batch_size},
        }
    )
    start = time.perf_counter()
    summary = augment(config, runner=ray_runner)
    wall = time.perf_counter() - start
    attempts = summary["attempts_this_run"]
    busy = sum(summary["actor_stage_seconds"].values())
    per_attempt = {k: v / attempts for k, v in summary["actor_stage_seconds"].items()} if attempts else {}
    round_s = summary["throughput"]["round_seconds"]
    return {
        "actors": actors,
        "wall_seconds": round(wall, 1),
        "attempts": attempts,
        "round_seconds": round(round_s, 1),
        "attempts_per_second": round(attempts / round_s, 3),
        # Per actor-second of work, i.e. without actor start-up and model loading.
        "steady_attempts_per_second": round(attempts / (busy / actors), 3),
        "actor_seconds_per_attempt": _rounded(per_attempt),
        "model_loads_per_actor": summary["actors"]["model_loads_per_actor"],
        # The pool lives for the job: only the first round pays actor start-up and model loading.
        "round_seconds_each": [round(r["seconds"], 1) for r in summary["rounds"]],
        # Round wall time not spent in an actor's stages: actor start + model load + scheduling
        # (paid once per job: the pool lives for every round).
        "startup_seconds": round(round_s - busy / actors, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--subjects", type=int, default=24)
    ap.add_argument("--attempts", type=int, default=24, help="attempts in all")
    ap.add_argument("--per-round", type=int, default=None, help="attempts per round (default: one round)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--inner", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--skip-run", action="store_true", help="only the capacity estimate")
    # capacity estimate (SD1.5 / 512 on one GPU per actor)
    ap.add_argument("--gpu-seconds-per-source", type=float, default=4.0, help="NTI + K edits, one source")
    ap.add_argument("--gpu-edits", type=int, default=4, help="K of --gpu-seconds-per-source")
    ap.add_argument("--gpu-inner-steps", type=float, default=10.0, help="mean NTI inner steps (early stop)")
    ap.add_argument("--subgroups", type=int, default=4)
    ap.add_argument("--over-provision", type=float, default=1.2)
    ap.add_argument("--gpu-actors", type=int, default=8)
    ap.add_argument("--model-load-seconds", type=float, default=30.0)
    args = ap.parse_args()

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()}
    result: dict = {"machine": machine}
    if not args.skip_run:
        import ray

        from prism_ray.models.tiny import build_tiny_family

        ray.init(num_cpus=max(args.actors), include_dashboard=False, log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            family = str(build_tiny_family(root / "family"))
            manifest = make_data(root, args.subjects)
            result["runs"] = [run(args, family, manifest, n, str(root / f"out{n}")) for n in args.actors]
        ray.shutdown()
        runs = result["runs"]
        if len(runs) > 1:
            base = result["runs"][0]["attempts_per_second"]
            steady = result["runs"][0]["steady_attempts_per_second"]
            result["speedup"] = {r["actors"]: round(r["attempts_per_second"] / base, 2) for r in runs}
            result["steady_speedup"] = {
                r["actors"]: round(r["steady_attempts_per_second"] / steady, 2) for r in result["runs"]
            }
    result["capacity_sd15_512"] = {
        "assumptions": {k: getattr(args, k) for k in (
            "gpu_seconds_per_source", "gpu_edits", "gpu_inner_steps", "subgroups", "over_provision",
            "gpu_actors", "model_load_seconds")},
        "estimates": [capacity(args, p) for p in (0.25, 0.5, 0.75)],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
