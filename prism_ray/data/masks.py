"""Per-row edit and keep masks from the manifest: PNG (or any Pillow raster) files, nonzero = in the mask."""

from __future__ import annotations

import numpy as np
from PIL import Image

from prism_ray.data.images import DECODE_ERRORS, DecodeConfig, ImageReadError, make_square, open_raster
from prism_ray.data.storage import read_image_bytes


def decode_mask(data: bytes, uri: str, config: DecodeConfig | None = None) -> np.ndarray:
    """Mask file bytes -> bool (H, W): nonzero in any colour channel (alpha ignored); ImageReadError if unreadable.

    Opened under the images' policy and limits (`data.images.open_raster`: formats, one frame,
    `config.max_pixels`, Pillow's decompression-bomb check; no smallest side, masks are resized). Palette
    images are judged by their colours, 16-bit and float masks by their raw values (never rescaled, so a
    16-bit mask of 0/1 stays a mask).
    """
    with open_raster(data, uri, config or DecodeConfig(), min_side=1, what="mask image") as image:
        try:
            if image.mode == "P":
                image = image.convert("RGBA")
            array = np.asarray(image)
        except DECODE_ERRORS as err:
            raise ImageReadError(uri, f"corrupt mask image ({type(err).__name__}: {err})") from None
    if array.ndim == 3:
        colour = array[..., :3] if array.shape[2] >= 3 else array[..., :1]  # drop alpha (LA, RGBA)
        return (colour != 0).any(axis=2)
    return array != 0


def read_mask(uri: str, image_size: tuple[int, int], config: DecodeConfig) -> np.ndarray:
    """A mask file for an image of `image_size` (width, height) -> bool (S, S) on the image's square.

    The mask covers the image's field of view at any resolution: it is resized to the image's size (a pixel is
    in when any mask pixel of its footprint is),
    then made square as the image was (`config.square` = center_crop | pad; padding is outside the mask).
    Raises ImageReadError (an item error) for a missing, unreadable or too large file.
    """
    mask = decode_mask(read_image_bytes(uri), uri, config)
    w, h = image_size
    if mask.shape != (h, w):
        # Box filter, then nonzero: a pixel is in when any mask pixel of its footprint is (thin lines survive).
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BOX)
        mask = np.asarray(resized) != 0
    return make_square(mask, config.square, 0)
