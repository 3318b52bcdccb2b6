"""`prism-ray rehearsal-family`: write SD v1.5- and CLIP ViT-L/14-shaped folders with random weights."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from prism_ray.config import BaseConfig
from prism_ray.models.rehearsal import build_rehearsal_family


class RehearsalFamilyConfig(BaseConfig):
    """Where to write the rehearsal family, at which scale, image size and seed (docs/rehearsal.md)."""

    out: str = Field(..., min_length=1, description="output folder: <out>/sd15 and <out>/clip-vit-large-patch14")
    scale: Literal["full", "reduced"] = Field(
        "full", description="full: SD v1.5's exact shapes (~6 GB); reduced: its layout at narrow widths (CI)")
    resolution: int = Field(512, ge=64, le=1024, multiple_of=64, description="image side (sets sample_size only)")
    seed: int = Field(0, ge=0)


def run(config: RehearsalFamilyConfig, runner=None) -> dict[str, Path]:
    """Build the family in this process; `runner` is unused (nothing here is distributed)."""
    t0 = time.perf_counter()
    paths = build_rehearsal_family(config.out, scale=config.scale, resolution=config.resolution, seed=config.seed)
    size = sum(p.stat().st_size for p in Path(config.out).rglob("*") if p.is_file())
    print(f"rehearsal family ({config.scale}, {config.resolution} px) written in {time.perf_counter() - t0:.0f}s, "
          f"{size / 1e9:.2f} GB: model {paths['model']}, clip {paths['clip']}", flush=True)
    return paths
