"""A job's input manifest and how its labels become captions."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from prism_ray.config import BaseConfig
from prism_ray.data.images import DecodeConfig


class DataConfig(BaseConfig):
    """Input manifest and how its labels become captions."""

    manifest: str = Field(..., min_length=1, description="Parquet or CSV manifest, any fsspec URI")
    image_column: str = "image_uri"
    image_root: str | None = Field(None, description="prefix for relative image URIs")
    adapter: str = "chexpert"
    adapter_options: dict[str, Any] = Field(default_factory=dict)
    split: str | None = Field(None, description="keep rows whose 'split' column equals this")
    limit: int | None = Field(None, ge=1)
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="how image files become pixels")
    edit_mask_column: str | None = Field(
        None, description="column of per-row edit-mask URIs (PNG, any resolution, nonzero = may change; blank = none)"
    )
    keep_mask_column: str | None = Field(
        None, description="column of per-row keep-mask URIs (PNG, any resolution, nonzero = must not change)"
    )
