"""The fine-tuning core step without Ray or DeepSpeed: fused AdamW on CUDA, bf16 autocast, no host sync."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

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


def gradient_norm(module: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of every parameter's gradient (a 0-d tensor on their device; no host sync)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(float("nan"))


def mean_loss_and_grad_norm(loss_sum: torch.Tensor, micro_steps: int, engine,
                            norm: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean loss over workers and micro-steps since the last call, and the last global gradient norm
    (`norm` where the caller measured it, else DeepSpeed's)."""
    loss = loss_sum / micro_steps
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss = loss / dist.get_world_size()
    norm = engine.get_global_grad_norm() if norm is None else norm
    norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=loss.dtype, device=loss.device)
    loss_value, norm_value = torch.stack(
        [loss, norm]
    ).tolist()  # sync point: the one host copy per logged step
    return loss_value, norm_value
