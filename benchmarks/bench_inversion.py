"""Reconstruction quality of the inversion methods on the shipped phantom-trained tiny family.

For each number of DDIM steps and each arm, phantoms are inverted together (one batch) and
reconstructed without an edit (guided, w = 7.5, the source branch of the editing pass); reported:
the relative squared latent error ||z - z0||^2 / ||z0||^2 (mean and max over images), its square
root (relative L2), the decoded reconstruction's L1 on [0, 1] against the decoded source latent
(so the VAE's own error is not counted), the null-text inner steps actually run per timestep, and
seconds per source image.

    python benchmarks/bench_inversion.py --images 4 --steps 20 50 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from prism_ray.engine import inversion as inv
from prism_ray.engine.images import decode, encode, preprocess
from prism_ray.engine.settings import InversionConfig

NO_EARLY_STOP = {"early_stop_epsilon": 0.0, "early_stop_slope": 0.0}
ARMS: dict[str, dict] = {
    "ddim": {"method": "ddim"},
    "negative_prompt": {"method": "negative_prompt"},
    "direct": {"method": "direct"},
    "null_text (reference: lr 1e-2, 10 inner, early stop)": {},
    "null_text lr 5e-2, early stop": {"learning_rate": 5e-2},
    "null_text lr 5e-2, 10 inner, no early stop": {"learning_rate": 5e-2, **NO_EARLY_STOP},
}


def phantoms(n: int, resolution: int):
    """n phantoms cycling through finding combinations, with their captions."""
    from prism_ray.phantom.render import PhantomAttributes, render_phantom

    kinds = [
        (PhantomAttributes(cardiomegaly=True, devices=frozenset({"pacemaker"})), "Cardiomegaly, Support Devices"),
        (PhantomAttributes(pleural_effusion=True), "Pleural Effusion"),
        (PhantomAttributes(sex="female", devices=frozenset({"tube", "ecg"})), "Support Devices"),
        (PhantomAttributes(), None),
    ]
    images, prompts = [], []
    for i in range(n):
        attributes, findings = kinds[i % len(kinds)]
        images.append(render_phantom(attributes, seed=100 + i, resolution=resolution))
        prompts.append(f"Chest X-ray showing {findings}" if findings else "Normal chest X-ray with no significant findings")
    return images, prompts


def run_arm(sd, z0: torch.Tensor, prompts: list[str], config: InversionConfig) -> dict:
    start = time.perf_counter()
    result, errors = inv.invert_many(sd, None, prompts, config, latents=z0)
    if errors:
        raise RuntimeError(f"inversion failed: {errors}")
    z = inv.reconstruct(sd.unet, inv.make_steps(config), result, config.guidance_scale)
    seconds = time.perf_counter() - start
    rel = inv.relative_squared_error(z, z0)
    l1 = np.abs(decode(sd.vae, z).astype(float) - decode(sd.vae, z0).astype(float)).mean(axis=(1, 2, 3)) / 255
    inner = None if result.inner_steps is None else float(result.inner_steps.float().mean())
    return {
        "relative_squared_mean": float(rel.mean()),
        "relative_squared_max": float(rel.max()),
        "relative_l2_mean": float(rel.sqrt().mean()),
        "pixel_l1_mean": float(l1.mean()),
        "inner_steps_per_timestep": inner,
        "seconds_per_source": seconds / len(prompts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from prism_ray.models.loading import load_sd_components

    sd = load_sd_components(args.model, device="cpu")
    images, prompts = phantoms(args.images, sd.resolution)
    z0 = encode(sd.vae, preprocess(images, sd.resolution))
    rows = []
    for steps in args.steps:
        for name, overrides in ARMS.items():
            config = InversionConfig(num_inference_steps=steps, batch_size=args.images, **overrides)
            row = {"steps": steps, "arm": name, **run_arm(sd, z0, prompts, config)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch threads {args.threads}; "
          f"{args.images} phantoms, guidance 7.5\n")
    print("| T | arm | rel. squared (mean / max) | rel. L2 | pixel L1 | inner / step | s / source |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        inner = "–" if r["inner_steps_per_timestep"] is None else f"{r['inner_steps_per_timestep']:.1f}"
        print(f"| {r['steps']} | {r['arm']} | {r['relative_squared_mean']:.2e} / {r['relative_squared_max']:.2e} | "
              f"{r['relative_l2_mean']:.4f} | {r['pixel_l1_mean']:.4f} | {inner} | {r['seconds_per_source']:.2f} |")


if __name__ == "__main__":
    main()
