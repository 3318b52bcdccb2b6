"""Image pre/post-processing of the method (docs/method.md §2) and VAE encode/decode."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from prism_ray.data.images import make_square

# Images per VAE call: the decoder's 512 px activations are the largest tensors of an editing batch
# (several GB for the N * (K + 1) images at once on SD1.5), so encode/decode go in chunks of this many.
VAE_BATCH = 4


def to_model_pixels(pixels: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8-valued pixels, any layout ((N, H, W, C), (N, C, H, W), (N, H, W)) -> float32 in [-1, 1], same shape.

    `x / 127.5 - 1` (docs/method.md §2). NumPy input is copied, so read-only arrays (as Ray
    hands out) are fine.
    """
    if isinstance(pixels, torch.Tensor):
        return pixels.to(device).float() / 127.5 - 1.0
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32)).to(device) / 127.5 - 1.0


def from_model_pixels(x: torch.Tensor) -> torch.Tensor:
    """Float pixels in [-1, 1], any layout -> uint8 tensor, same shape: (x / 2 + 0.5).clamp(0, 1), round to 8 bits."""
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def center_square(image: np.ndarray, offsets: tuple[int, int, int, int] = (0, 0, 0, 0)) -> np.ndarray:
    """Crop (left, right, top, bottom) offsets, then the centred square of the remainder."""
    left, right, top, bottom = offsets
    h, w = image.shape[:2]
    return make_square(image[top : h - bottom, left : w - right], "center_crop")


def preprocess(images: list[np.ndarray] | np.ndarray, resolution: int, offsets=(0, 0, 0, 0)) -> torch.Tensor:
    """uint8 (H, W[, C]) images -> float (N, 3, R, R) in [-1, 1]: square, resize, gray -> 3 channels."""
    out = []
    for image in images:
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        square = center_square(image[:, :, :3], offsets)
        x = torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1)[None].float()  # (1, 3, S, S)
        if x.shape[-1] != resolution:
            # Antialiased bicubic, as PIL's LANCZOS-like resize of the reference, without PIL round-trips.
            x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255)
        out.append(to_model_pixels(x))
    return torch.cat(out)


@torch.no_grad()
def vae_latent_moments(
    vae, images: torch.Tensor, batch_size: int | None = VAE_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, R, R) in [-1, 1] -> (mean, std) of the latent posterior, both times the VAE scaling factor.

    `batch_size` images per encoder call bound its activation memory (None: one call).
    """
    step = batch_size or max(1, len(images))
    means, stds = [], []
    for chunk in [images[i : i + step] for i in range(0, len(images), step)] or [images]:
        posterior = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch_size: int | None = VAE_BATCH) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> latents: the posterior *mean* times the VAE scaling factor."""
    return vae_latent_moments(vae, images, batch_size)[0]


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int | None = VAE_BATCH) -> np.ndarray:
    """Latents -> uint8 (N, R, R, 3): decode, (x / 2 + 0.5).clamp(0, 1), round to 8 bits.

    `batch_size` latents per decoder call bound its activation memory (None: one call); the uint8 images
    of all chunks are gathered on the device and copied to the host once.
    """
    step = batch_size or max(1, len(latents))
    out = []
    for chunk in [latents[i : i + step] for i in range(0, len(latents), step)] or [latents]:
        x = vae.decode(chunk.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample  # (n, 3, R, R)
        out.append(from_model_pixels(x).permute(0, 2, 3, 1))
    return torch.cat(out).cpu().numpy()
