"""Where a job's models come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prism_ray.config import BaseConfig
class ModelConfig(BaseConfig):
    """Where the SD components and the filter CLIP come from (local path, fsspec URI or hub id)."""

    path: str = Field("tiny", description="diffusers folder; 'tiny' = the project's tiny family")
    clip_path: str | None = Field(None, description="CLIP folder; default: <path>/clip if present")
    cache_dir: str | None = Field(None, description="local cache for fsspec/hub downloads")
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    allow_tf32: bool = Field(False, description="TF32 matmuls change NTI numerics; off by default")
