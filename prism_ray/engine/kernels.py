"""Kernel choices for the engine's models: channels_last, xformers attention, an optionally compiled U-Net."""

from __future__ import annotations

import torch

from prism_ray.engine.attention import xformers_available
from prism_ray.engine.settings import EngineComputeConfig


def prepare_models(sd, compute: EngineComputeConfig) -> None:
    """Set the U-Net's and VAE's memory format and the U-Net's attention kernel, in place, once.

    channels_last (default: on CUDA) lets cuDNN pick its NHWC convolution kernels (faster in TF32 and
    bf16 on tensor cores). `attention="xformers"` without xformers installed is a ValueError; "auto"
    uses it on CUDA when installed. Prompt-to-prompt's processors replace these during the editing pass
    and restore them after.
    """
    channels_last = compute.channels_last if compute.channels_last is not None else sd.device.type == "cuda"
    if channels_last:
        sd.unet.to(memory_format=torch.channels_last)
        sd.vae.to(memory_format=torch.channels_last)
    if compute.attention == "xformers" and not xformers_available():
        raise ValueError("compute.attention: 'xformers' is not installed (pip install xformers), use 'auto'")
    if xformers_available() and sd.device.type == "cuda":
        sd.unet.enable_xformers_memory_efficient_attention()


def inversion_unet(sd, compute: EngineComputeConfig):
    """The U-Net the inversion calls: `torch.compile`d when `compute.compile_unet` (fixed shapes, no
    attention processors swapped in), else `sd.unet` itself. The compiled module shares the weights."""
    if not compute.compile_unet:
        return sd.unet
    return torch.compile(sd.unet, dynamic=False)
