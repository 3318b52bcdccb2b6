"""The fine-tuning math without Ray or DeepSpeed: schedule, latents, the diffusion loss, U-Net setup, digests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prism_ray.engine.images import vae_latent_moments
from prism_ray.engine.text import encode_prompts

# --- schedule and conditioning ---------------------------------------------------------------


def make_noise_scheduler(prediction_type: str = "epsilon", num_train_timesteps: int = 1000):
    """DDPM with SD's betas (`engine.scheduler.SD_BETAS`) and `num_train_timesteps` steps."""
    from prism_ray.engine.scheduler import make_ddpm_scheduler

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")
    return make_ddpm_scheduler(prediction_type, num_train_timesteps)


def model_prediction_type(model_scheduler: Any, override: str | None = None) -> str:
    """The training target: `override` if given, else the model folder's scheduler config (default epsilon)."""
    if override is not None:
        return override
    return str(getattr(model_scheduler, "config", {}).get("prediction_type", "epsilon"))


def latents_from_moments(
    mean: torch.Tensor, std: torch.Tensor | None, mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`mode="mean"` (PRISM) returns the mean; `"sample"` draws mean + std * eps (works on cached moments)."""
    if mode == "mean":
        return mean
    if mode != "sample":
        raise ValueError(f"latents {mode!r}: expected 'mean' or 'sample'")
    if std is None:
        raise ValueError("latents 'sample' needs the posterior std")
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(mean.device)
    return mean + std * eps


def image_latents(vae, images: torch.Tensor, mode: str = "mean", generator: torch.Generator | None = None):
    """Frozen-VAE latents of (N, 3, R, R) images: posterior mean x scaling factor, or a sample."""
    mean, std = vae_latent_moments(vae, images)
    return latents_from_moments(mean, std, mode, generator)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """One CPU generator per (seed, worker, step): a resumed run draws the same noise a straight run would."""
    key = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


# --- the loss --------------------------------------------------------------------------------


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, fp32, carries the U-Net's graph
    timesteps: torch.Tensor  # (B,)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU-drawn tensor -> device; to a GPU through pinned memory, so the copy does not wait for the GPU."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """The denoising objective on (cached or fresh) latents: noise, random t, DDPM add_noise, MSE.

    The target is the noise for `epsilon` and the velocity for `v_prediction`, per the scheduler's
    config. Noise and timesteps come from `generator` on CPU so that runs are reproducible on any device.
    """
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    latents = latents.to(device, torch.float32)
    b = latents.shape[0]
    noise = _to_device(torch.randn(latents.shape, generator=generator), device)  # (B, 4, h, w)
    timesteps = _to_device(
        torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator), device
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")
    pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states.to(device, dtype)).sample
    # MSE in fp32 even when the U-Net runs in bf16/fp16.
    return LossOutput(F.mse_loss(pred.float(), target.float(), reduction="mean"), timesteps)


def training_loss(
    sd,
    noise_scheduler,
    images: torch.Tensor,
    captions: Sequence[str],
    *,
    latents: str = "mean",
    generator: torch.Generator | None = None,
    unet=None,
) -> LossOutput:
    """Full step from pixels: frozen VAE + text encoder, then `diffusion_loss` on `unet` (default sd.unet)."""
    z = image_latents(sd.vae, images, latents, generator)
    context = encode_prompts(sd.tokenizer, sd.text_encoder, list(captions))
    return diffusion_loss(unet if unet is not None else sd.unet, noise_scheduler, z, context, generator)


def configure_unet(
    unet, *, gradient_checkpointing: bool = False, attention: str = "sdpa", channels_last: bool | None = None
) -> None:
    """Trainable U-Net setup: gradient checkpointing, the attention processor (SDPA, xformers, eager) and
    the memory format (channels_last: default on CUDA, where cuDNN's NHWC kernels are faster)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.requires_grad_(True)
    unet.train()
    if channels_last if channels_last is not None else next(unet.parameters()).is_cuda:
        unet.to(memory_format=torch.channels_last)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if attention == "sdpa":
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ValueError("train.attention 'sdpa': this torch has no scaled_dot_product_attention")
        unet.set_attn_processor(AttnProcessor2_0())
    elif attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()  # raises a clear error if xformers is missing
    elif attention == "eager":
        unet.set_attn_processor(AttnProcessor())
    else:
        raise ValueError(f"train.attention {attention!r}: expected sdpa, xformers or eager")


# --- validation images -----------------------------------------------------------------------


@torch.no_grad()
def sample_images(
    unet,
    sd,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 10,
    guidance_scale: float = 7.5,
    seed: int = 0,
) -> np.ndarray:
    """A few guided DDIM steps of the U-Net being trained -> uint8 (N, R, R, 3); prompt i draws from seed + i."""
    from prism_ray.engine.sampling import generate_images

    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    was_training = unet.training
    unet.eval()
    try:
        return generate_images(
            sd,
            list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generators=generators,
            unet=unet,
        )
    finally:
        unet.train(was_training)


# --- weights ----------------------------------------------------------------------------------


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names and fp32 values, in name order: equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    return state_dict_digest(module.state_dict())
