"""Tile grayscale images into one labelled PNG (phantoms, counterfactuals, samples)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np


def save_contact_sheet(
    images: Sequence[np.ndarray],
    path: str,
    ncols: int | None = None,
    labels: Sequence[str] | None = None,
    upscale: int = 1,
) -> None:
    """Tile uint8 grayscale images (same size) into one PNG at `path` (local path or fsspec URI).

    `labels` are printed under the tiles; `upscale` enlarges each tile (nearest neighbour) so
    small phantoms stay readable.
    """
    import fsspec
    from PIL import Image, ImageDraw

    if len(images) == 0:
        raise ValueError("images must not be empty")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels has {len(labels)} entries for {len(images)} images")
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    shape = np.shape(images[0])
    if len(shape) != 2 or any(np.shape(im) != shape for im in images):
        raise ValueError("images must all be 2-D (H, W) arrays of the same shape")
    h, w = shape[0] * upscale, shape[1] * upscale
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    gap, label_h = 2, (12 if labels is not None else 0)
    sheet = Image.new("L", (ncols * (w + gap) + gap, nrows * (h + label_h + gap) + gap), 40)
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        x0, y0 = gap + c * (w + gap), gap + r * (h + label_h + gap)
        tile = np.asarray(im, dtype=np.uint8).repeat(upscale, axis=0).repeat(upscale, axis=1)
        sheet.paste(Image.fromarray(tile, mode="L"), (x0, y0))
        if labels is not None:
            draw.text((x0 + 1, y0 + h), str(labels[i])[: max(1, w // 6)], fill=230)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())
