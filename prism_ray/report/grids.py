"""Image grids of counterfactual examples: original | counterfactual | signed difference map."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prism_ray.report.html import HtmlReport


@dataclass(frozen=True)
class Example:
    """One source image and its counterfactual (uint8 (H, W) or (H, W, 3), same size) with the text
    shown beside them: which image, which edit, the scores, why it was picked (strongest, random)."""

    original: np.ndarray
    counterfactual: np.ndarray
    caption: str


def shared_scale(examples: Sequence[Example], percentile: float = 99.5) -> float:
    """One saturation level (grey levels) for all difference maps of a grid, so rows compare: the
    largest per-pair `percentile` of |counterfactual − original|, at least 1."""
    from prism_ray.report.plots import gray_levels

    levels = [
        np.percentile(np.abs(gray_levels(e.counterfactual) - gray_levels(e.original)), percentile)
        for e in examples
    ]
    return max([1.0, *map(float, levels)])


def add_counterfactual_grid(
    report: HtmlReport,
    examples: Sequence[Example],
    *,
    caption: str | None = None,
    source_name: str = "original",
    id: str | None = None,
    min_display_width: int = 160,
) -> None:
    """One row per example: the source, its counterfactual and their signed difference map, each
    column explained in a sentence. Small images are enlarged by an integer factor (sharp pixels)."""
    from prism_ray.report.plots import signed_difference_map

    if not examples:
        report.add_paragraph("No examples.", css_class="note")
        return
    scale = shared_scale(examples)
    width = np.shape(examples[0].original)[1]
    display_width = width * math.ceil(min_display_width / width) if width < min_display_width else None
    rows = [
        (
            e.caption,
            [e.original, e.counterfactual, signed_difference_map(e.original, e.counterfactual, scale)],
        )
        for e in examples
    ]
    report.add_image_grid(
        rows,
        [source_name, "counterfactual", "signed difference"],
        column_explanations=[
            f"The {source_name} image the edit started from.",
            "The same image after the intervention named beside the row.",
            (
                "Counterfactual minus original per pixel: red = brighter, blue = darker, white = unchanged "
                f"(saturates at ±{scale:.0f} grey levels, the same for every row)."
            ),
        ],
        caption=caption,
        id=id,
        display_width=display_width,
    )
