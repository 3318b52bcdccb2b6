"""Fine-tuning throughput (images/s per worker) with and without cached latents, tiny family on CPU.

    python benchmarks/bench_finetune.py --workers 1 --steps 20 --micro-batch 4

Prints a markdown table: the core step alone (no Ray) and the Ray Train + DeepSpeed job, each with
VAE/text encoding per step vs precomputed latents + text embeddings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow as pa
import torch

CAPTIONS = ["chest x-ray showing cardiomegaly", "chest x-ray showing pleural effusion", "chest x-ray"]


def write_dataset(root: Path, n: int) -> Path:
    from prism_ray.data.storage import write_png, write_table

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        write_png(rng.integers(0, 256, (64, 64), dtype=np.uint8), str(root / f"img{i}.png"))
        rows.append({"image_uri": f"img{i}.png", "caption": CAPTIONS[i % 3]})
    write_table(pa.Table.from_pylist(rows), str(root / "manifest.parquet"))
    return root / "manifest.parquet"


def bench_core(family: Path, steps: int, batch: int, cached: bool, threads: int = 1) -> float:
    """images/s of the core step with torch AdamW, one process (no Ray, no DeepSpeed)."""
    from prism_ray.engine.text import encode_prompts
    from prism_ray.models.loading import load_sd_components
    from prism_ray.training.diffusion import (
        diffusion_loss,
        image_latents,
        make_noise_scheduler,
        step_generator,
    )

    torch.set_num_threads(threads)  # as a Ray worker with 1 CPU gets (OMP_NUM_THREADS=1)
    sd = load_sd_components(str(family), device="cpu")
    sd.unet.train()
    scheduler = make_noise_scheduler()
    optimizer = torch.optim.AdamW(sd.unet.parameters(), lr=1e-5, weight_decay=1e-2)
    images = torch.rand(batch, 3, sd.resolution, sd.resolution) * 2 - 1
    captions = [CAPTIONS[i % 3] for i in range(batch)]
    z_cached = image_latents(sd.vae, images)
    ctx_cached = encode_prompts(sd.tokenizer, sd.text_encoder, captions)
    rates = []
    for step in range(steps):
        started = time.perf_counter()
        if cached:
            z, ctx = z_cached, ctx_cached
        else:
            z, ctx = image_latents(sd.vae, images), encode_prompts(sd.tokenizer, sd.text_encoder, captions)
        loss = diffusion_loss(sd.unet, scheduler, z, ctx, step_generator(0, 0, step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rates.append(batch / (time.perf_counter() - started))
    return statistics.median(rates[2:])  # skip warm-up steps


def bench_ray(family: Path, manifest: Path, storage: Path, steps: int, batch: int, workers: int, cached: bool):
    from prism_ray.config import build_config
    from prism_ray.data.storage import read_table
    from prism_ray.distributed.trainer import fit
    from prism_ray.pipelines.finetune import FinetuneConfig, run

    name = f"bench-{'cached' if cached else 'pixels'}-{workers}w"
    config = build_config(
        FinetuneConfig,
        {
            "model": {"path": str(family)},
            "data": {"manifest": str(manifest), "image_root": str(manifest.parent)},
            "train": {
                "max_steps": steps,
                "micro_batch_size": batch,
                "zero_stage": 2 if workers > 1 else 0,
                "cache_latents": cached,
                "checkpoint_every": steps,
            },
            "compute": {"num_workers": workers, "cpus_per_worker": 1.0},
            "run": {"storage_path": str(storage), "name": name, "export": False},
        },
    )
    started = time.perf_counter()
    result = run(config, runner=fit)
    wall = time.perf_counter() - started
    rows = read_table(f"{result.run_path}/metrics/part-{1:08d}-{steps:08d}.parquet").to_pylist()
    per_worker = statistics.median(r["images_per_second"] for r in rows[2:]) / workers
    return per_worker, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()

    import ray

    from prism_ray.models.tiny import build_tiny_family

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        tmp_path = Path(tmp)
        family = build_tiny_family(tmp_path / "tiny")
        (tmp_path / "data").mkdir()
        manifest = write_dataset(tmp_path / "data", args.images)
        for cached in (False, True):
            rate = bench_core(family, args.steps, args.micro_batch, cached)
            rows.append(("core step (no Ray)", 1, cached, rate, None))
        if not args.skip_ray:
            ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
            for cached in (False, True):
                rate, wall = bench_ray(
                    family, manifest, tmp_path / "runs", args.steps, args.micro_batch, args.workers, cached
                )
                rows.append(("Ray Train + DeepSpeed", args.workers, cached, rate, wall))
            ray.shutdown()

    print(f"\nFine-tuning throughput, tiny family 64x64, CPU ({os.cpu_count()} cores), "
          f"micro-batch {args.micro_batch}, {args.steps} steps (median after 2 warm-up steps)\n")
    print("| path | workers | latents | img/s per worker | run wall s |")
    print("|---|---:|---|---:|---:|")
    for path, workers, cached, rate, wall in rows:
        latents = "cached (precomputed)" if cached else "encoded per step"
        print(f"| {path} | {workers} | {latents} | {rate:.2f} | {'' if wall is None else f'{wall:.0f}'} |")


if __name__ == "__main__":
    main()
