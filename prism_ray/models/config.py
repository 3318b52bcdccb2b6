"""Where a job's models come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from prism_ray.config import BaseConfig


class ModelConfig(BaseConfig):
    """Where the SD components and the filter CLIP come from (local path, fsspec URI or hub id)."""

    path: str = Field("tiny", description="diffusers folder; 'tiny' = the project's tiny family")
    clip_path: str | None = Field(None, description="CLIP folder; default: <path>/clip if present")
    cache_dir: str | None = Field(None, description="local cache for fsspec/hub downloads")
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="before")
    @classmethod
    def _no_allow_tf32(cls, data):
        # Removed: TF32 is part of the precision policy (docs/method.md §13), not of where models come from.
        if isinstance(data, dict) and "allow_tf32" in data:
            raise ValueError(
                "model.allow_tf32 was removed: TF32 follows inversion.precision (override: inversion.allow_tf32)"
            )
        return data
