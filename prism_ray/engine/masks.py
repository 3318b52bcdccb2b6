"""User edit and keep masks on the latent grid: where an edit may change the image (docs/method.md §10.3).

A user gives, per image, an **edit mask** (the region allowed to change) and/or a **keep mask** (regions that
must not change), as RadEdit does (Pérez-García et al. 2024, "RadEdit: stress-testing biomedical vision
models via diffusion image editing"). Both cover the image's field of view at any resolution; nonzero = in
the mask. On the latent grid they become one *region*: edit mask (everywhere when none) minus keep mask.
The editor intersects the region with the derived blend mask (noise-difference or attention) when local
blend is on, or uses the region alone when it is off, and from the blend's start step on keeps every latent
outside the final mask equal to the source branch's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from prism_ray.engine.images import center_square


def _binary(mask) -> np.ndarray:
    """(H, W) or (H, W, C), any dtype -> bool (H, W): nonzero in any channel."""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim == 3:
        array = (array != 0).any(axis=2)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {array.shape}")
    return array != 0


def latent_mask(
    mask,
    image_shape: tuple[int, int],
    latent_size: int,
    offsets: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> torch.Tensor:
    """A user mask -> bool (latent_size, latent_size) on the latent grid of its image.

    mask (H', W') or (H', W', C), nonzero = in. It covers the image (H, W) = `image_shape`: a mask of another
    size is first resized to it, then cropped as the image is (`images.center_square` with the same offsets),
    then to the latent grid; each resize keeps a cell in the mask when any pixel of its footprint is (area
    resize > 0), so a thin region never vanishes on a coarser grid.
    """
    binary = torch.from_numpy(_binary(mask)).float()[None, None]  # (1, 1, H', W')
    h, w = image_shape
    if tuple(binary.shape[-2:]) != (h, w):
        binary = (F.interpolate(binary, size=(h, w), mode="area") > 0).float()
    square = torch.from_numpy(np.ascontiguousarray(center_square(binary[0, 0].numpy(), offsets)))
    cells = F.interpolate(square[None, None], size=(latent_size, latent_size), mode="area")
    return cells[0, 0] > 0


def edit_region(
    edit_mask: torch.Tensor | None, keep_mask: torch.Tensor | None, latent_size: int
) -> torch.Tensor | None:
    """Latent masks (h, w) bool -> the region edits may change: edit mask (everywhere if None) minus keep mask;
    None when neither is given."""
    if edit_mask is None and keep_mask is None:
        return None
    region = torch.ones(latent_size, latent_size, dtype=torch.bool) if edit_mask is None else edit_mask.bool()
    if keep_mask is not None:
        region = region & ~keep_mask.bool()
    return region
