"""The fine-tuning core step without Ray or DeepSpeed: fused AdamW on CUDA, bf16 autocast, no host sync."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from prism_ray.training.diffusion import diffusion_loss


def make_adamw(
    params,
    *,
    lr: float = 1e-5,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    device: torch.device | str = "cpu",
) -> torch.optim.AdamW:
    """PRISM's AdamW; the fused CUDA kernel (one launch for all parameters) when on a GPU."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None
    )


def core_step(
    unet,
    optimizer,
    noise_scheduler,
    latents,
    context,
    generator=None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One optimisation step on cached latents -> the loss, still on the device (read it every N steps).

    `autocast_dtype` (e.g. bfloat16) runs the U-Net under autocast with fp32 weights and optimizer.
    """
    device = next(unet.parameters()).device
    use = autocast_dtype not in (None, torch.float32)
    with torch.autocast(device.type, dtype=autocast_dtype) if use else nullcontext():
        loss = diffusion_loss(unet, noise_scheduler, latents, context, generator).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
