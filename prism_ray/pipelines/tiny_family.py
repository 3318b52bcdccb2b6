"""`prism-ray tiny-family`: write a random-weight tiny model family (the shipped family's architecture)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from prism_ray.config import BaseConfig
from prism_ray.models.tiny import TINY_SEED, build_tiny_family


class TinyFamilyConfig(BaseConfig):
    """Where to write a random-weight tiny family, its seed and image size."""

    out: str = Field(..., min_length=1, description="output folder")
    seed: int = Field(TINY_SEED, ge=0)
    resolution: int = Field(64, ge=16, le=1024, multiple_of=16)


def run(config: TinyFamilyConfig, runner=None) -> Path:
    """Build the family in this process; `runner` is unused (nothing here is distributed)."""
    path = build_tiny_family(config.out, seed=config.seed, resolution=config.resolution)
    print(f"tiny family written to {path}")
    return path
