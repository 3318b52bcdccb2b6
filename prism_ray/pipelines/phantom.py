"""`prism-ray phantom`: write a synthetic phantom chest X-ray dataset with ground-truth attributes."""

from __future__ import annotations

from pydantic import Field

from prism_ray.config import BaseConfig
from prism_ray.phantom.dataset import PhantomDatasetConfig, PhantomDatasetSummary, write_phantom_dataset


class PhantomJobConfig(BaseConfig):
    """`prism-ray phantom`: write a phantom dataset to `out` (any fsspec URI)."""

    out: str = Field(..., min_length=1, description="output folder or URI")
    dataset: PhantomDatasetConfig = PhantomDatasetConfig()


def run(config: PhantomJobConfig, runner=None) -> PhantomDatasetSummary:
    """Write the dataset in this process; `runner` is unused (nothing here is distributed)."""
    summary = write_phantom_dataset(config.out, config.dataset)
    print(f"phantom dataset: {summary.n_subjects} subjects {summary.split_counts} -> {summary.manifest_uri}")
    return summary
