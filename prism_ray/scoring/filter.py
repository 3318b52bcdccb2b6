"""The accept filter: which counterfactuals to keep, from their CLIP scores and reconstruction error."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from pydantic import Field

from prism_ray.config import BaseConfig
class FilterConfig(BaseConfig):
    """Which counterfactuals to keep, from the scores of `ClipScorer.score` (+ the reconstruction error).

    PRISM keeps S_CLIP >= 0.1. LANCE additionally requires CLIP image-image similarity and
    image-text similarity of the edit above thresholds (it uses 0.7 / 0.2 / 0.2); those two
    are off (None) by default, as is prism_ray's own `reconstruction_error_max`.
    """

    s_clip_min: float = Field(0.1, ge=-1.0, le=1.0)
    image_image_min: float | None = Field(None, ge=-1.0, le=1.0)
    image_text_min: float | None = Field(None, ge=-1.0, le=1.0)
    reconstruction_error_max: float | None = Field(
        None,
        ge=0.0,
        description="reject every edit of a source whose unedited reconstruction has a relative squared "
        "latent error above this (the inversion failed); None = off, as in PRISM",
    )

    reconstruction_psnr_min: float | None = Field(
        None,
        ge=0.0,
        description="reject every edit of a source whose unedited reconstruction is below this PSNR (dB) from "
        "the source: the model does not fit the image (phantoms ~30 dB, unseen real anatomy ~21 dB); None = off",
    )
    fit_warning_psnr: float = Field(
        25.0, ge=0.0, description="the run summary warns when over a quarter of the sources reconstruct below this"
    )

    def accept(self, scores: Mapping[str, Any]) -> np.ndarray:
        """Boolean (N,) array: every active threshold met (score >= minimum, error <= maximum).
        NaN is rejected."""
        checks = [
            ("s_clip", self.s_clip_min, np.greater_equal),
            ("clip_image_image", self.image_image_min, np.greater_equal),
            ("clip_image_text", self.image_text_min, np.greater_equal),
            ("reconstruction_error", self.reconstruction_error_max, np.less_equal),
            ("reconstruction_psnr", self.reconstruction_psnr_min, np.greater_equal),
        ]
        keep = None
        for key, bound, meets in checks:
            if bound is None:
                continue
            if key not in scores:
                raise ValueError(f"scores lack {key!r}, needed by the filter threshold on it")
            ok = meets(np.asarray(scores[key], dtype=np.float64), bound)
            keep = ok if keep is None else keep & ok
        return keep
