"""Classifier-free-guided DDIM sampling (eta = 0) with the reference scheduler: the one denoising loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch

from prism_ray.engine.images import decode
from prism_ray.engine.scheduler import DDIMSteps, make_ddim_scheduler
from prism_ray.engine.text import encode_prompts

StepBegin = Callable[[int], None]  # (step index) -> None, before the U-Net call
StepEnd = Callable[[int, torch.Tensor], torch.Tensor]  # (step index, z_{t-1}) -> z_{t-1}


@torch.no_grad()
def sample_latents(
    unet,
    cond_context: torch.Tensor,
    uncond_context: torch.Tensor,
    latents: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float | torch.Tensor = 7.5,
    *,
    autocast_dtype: torch.dtype | None = None,
    on_step_begin: StepBegin | None = None,
    on_step_end: StepEnd | None = None,
    prediction_type: str = "epsilon",
    step_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise z_T -> z_0: eps = eps_u + w * (eps_c - eps_u), then a deterministic DDIM step.

    latents (N, C, h, w): z_T. cond_context (N, 77, D). uncond_context (n, 77, D), or (T, n, 77, D)
    for one context per step (null-text inversion's optimised embeddings); n = N, or a divisor of
    N when N / n consecutive latents share a row (the K + 1 branches of one edited image).
    Latents and the guided eps stay float32 whatever the U-Net's dtype; `autocast_dtype` runs the
    U-Net call (only) under torch.autocast. `on_step_begin(i)` runs before step i's U-Net call
    (attention controllers read the step there); `on_step_end(i, z)` may replace the new latents.
    `prediction_type`: what the U-Net predicts (the model scheduler's); v is turned into eps after guidance.
    `guidance_scale`: one scale, or a (T, N) table: step i guides latent r with [i, r].
    `step_noise` (T, n, C, h, w): edit-friendly DDPM's noise; each step is then the stochastic (eta = 1)
    step's mean plus step_noise[i] (`DDIMSteps.prev_mean`), the row shared like the unconditional context.
    Returns z_0 (N, C, h, w) float32.
    """
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    steps = DDIMSteps(make_ddim_scheduler(num_inference_steps, prediction_type=prediction_type))
    per_step = uncond_context.dim() == 4
    if per_step and uncond_context.shape[0] != len(steps.timesteps):
        raise ValueError(f"uncond_context: {uncond_context.shape[0]} per-step contexts for {num_inference_steps} steps")
    n, rows = latents.shape[0], uncond_context.shape[-3]
    if cond_context.shape[0] != n or n % rows:
        raise ValueError(f"contexts: {cond_context.shape[0]} cond / {rows} uncond rows for {n} latents")
    cond = cond_context.to(device, dtype)
    uncond_all = uncond_context.to(device, dtype)
    autocast = nullcontext() if autocast_dtype in (None, torch.float32) else torch.autocast(device.type, dtype=autocast_dtype)
    z = latents.to(device, torch.float32)
    table = isinstance(guidance_scale, torch.Tensor)
    if table and tuple(guidance_scale.shape) != (len(steps.timesteps), n):
        raise ValueError(f"guidance_scale: expected ({len(steps.timesteps)}, {n}), got {tuple(guidance_scale.shape)}")
    scales = guidance_scale.to(device, torch.float32)[..., None, None, None] if table else None  # (T, N, 1, 1, 1)
    for i, t in enumerate(steps.timesteps.tolist()):
        if on_step_begin is not None:
            on_step_begin(i)
        uncond = uncond_all[i] if per_step else uncond_all
        if rows != n:
            uncond = uncond.repeat_interleave(n // rows, 0)  # (N, 77, D)
        with autocast:
            eps = unet(torch.cat([z, z]).to(dtype), t, encoder_hidden_states=torch.cat([uncond, cond])).sample  # (2N, C, h, w)
        eps_u, eps_c = eps.float().chunk(2)
        w = scales[i] if table else guidance_scale
        eps_g = steps.epsilon(eps_u + w * (eps_c - eps_u), t, z)
        if step_noise is None:
            z = steps.prev_step(eps_g, t, z)
        else:
            noise = step_noise[i].to(device, torch.float32)
            z = steps.prev_mean(eps_g, t, z)[0] + (noise if rows == n else noise.repeat_interleave(n // rows, 0))
        if on_step_end is not None:
            z = on_step_end(i, z)
    return z


def initial_latents(
    generators: Sequence[torch.Generator], shape: tuple[int, int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """z_T ~ N(0, I): (N, *shape), row i drawn from generators[i] alone, so a sample never depends on its batch-mates."""
    z = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators])
    return z.to(device)


@torch.no_grad()
def text_to_latents(
    unet,
    tokenizer,
    text_encoder,
    prompts: list[str],
    *,
    generators: Sequence[torch.Generator],
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Prompts -> sampled latents (N, C, h, w), one generator per prompt, "" as the unconditional prompt."""
    if len(generators) != len(prompts):
        raise ValueError(f"generators: {len(generators)} for {len(prompts)} prompts (one per item)")
    cond = encode_prompts(tokenizer, text_encoder, prompts)  # (N, 77, D)
    uncond = encode_prompts(tokenizer, text_encoder, [""])  # (1, 77, D), shared by every prompt
    size = unet.config.sample_size
    z = initial_latents(generators, (unet.config.in_channels, size, size), next(unet.parameters()).device)
    return sample_latents(unet, cond, uncond, z, num_inference_steps, guidance_scale, prediction_type=prediction_type)


def generate_images(
    sd,
    prompts: list[str],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    generators: Sequence[torch.Generator],
    unet=None,
) -> np.ndarray:
    """Text-to-image with an SDComponents: prompts -> uint8 (N, R, R, 3), one generator per prompt.

    `unet` replaces sd.unet (e.g. the U-Net being fine-tuned, for validation images).
    """
    z = text_to_latents(
        sd.unet if unet is None else unet,
        sd.tokenizer,
        sd.text_encoder,
        list(prompts),
        generators=generators,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        prediction_type=sd.prediction_type,
    )
    return decode(sd.vae, z)
