"""GPU memory budget: inversion and edit batch sizes chosen from per-image peak estimates (`compute.gpu_memory_gb`).

Peak GPU memory at SD1.5 / 512 px (64 x 64 latents), measured on one H200 (issue 17; bench_engine arms,
K = 4 edits, null-text inversion, `torch.cuda.max_memory_allocated`, VAE decode not yet chunked):

    batch 4, fp32 inversion + fp32 edits   60 GB
    batch 4, fp32 inversion + bf16 edits   28 GB
    batch 8, TF32 inversion + bf16 edits   41 GB

The two bf16-edit runs differ by 13 GB for 4 more images: 3.25 GB per image for whichever pass peaks
(taken for both the null-text inversion, forward + backward to the context, and the bf16 editing pass
of one image's K + 1 = 5 branches: 0.65 GB per branch), leaving 28 - 4 x 3.25 = 15 GB of fixed cost
(weights ~4.3 GB, CUDA context, workspace, and the decode of all 20 images at once, which
`images.VAE_BATCH` now chunks). fp32 edits add 32 GB at batch 4: (60 - 15) / 4 = 11.25 GB per image,
2.25 GB per branch. With the decode chunked, the fixed cost is estimated as the weights plus
`WORKSPACE_GB`. Every estimate is multiplied by `SAFETY` before it is compared with the budget.
Other models scale with the latent area (activations do), the same U-Net widths assumed.
"""

from __future__ import annotations

import math

import torch

from prism_ray.engine.precision import PrecisionPolicy

GB = 1024**3
SD15_LATENT_AREA = 64 * 64
INVERT_GB = {torch.float32: 3.25, torch.bfloat16: 3.25, torch.float16: 3.25}  # per image, NTI fwd + bwd
EDIT_BRANCH_GB = {torch.float32: 2.25, torch.bfloat16: 0.65, torch.float16: 0.65}  # per branch, edit pass
WORKSPACE_GB = 4.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack, one VAE chunk
SAFETY = 1.2


def weights_gb(sd) -> float:
    """Parameters and buffers of the U-Net, VAE and text encoder, in GB."""
    total = 0
    for module in (sd.unet, sd.vae, sd.text_encoder):
        for tensor in list(module.parameters()) + list(module.buffers()):
            total += tensor.numel() * tensor.element_size()
    return total / GB


def _area_scale(sd) -> float:
    side = int(sd.unet.config.sample_size)
    return side * side / SD15_LATENT_AREA


def per_image_gb(sd, policy: PrecisionPolicy, num_edits: int) -> tuple[float, float]:
    """(inversion, editing pass) peak GB per image, safety margin included."""
    scale = _area_scale(sd) * SAFETY
    return INVERT_GB[policy.inner_dtype] * scale, EDIT_BRANCH_GB[policy.edit_dtype] * (num_edits + 1) * scale


def fit_batch_sizes(
    sd,
    policy: PrecisionPolicy,
    inversion_batch: int,
    edit_batch: int,
    num_edits: int,
    gpu_memory_gb: float | None,
) -> tuple[int, int]:
    """The configured batch sizes, lowered to what fits `gpu_memory_gb` on a CUDA device.

    No cap on other devices or with `gpu_memory_gb=None`. ValueError (naming the knob) when not even
    one image fits.
    """
    if gpu_memory_gb is None or sd.device.type != "cuda":
        return inversion_batch, edit_batch
    free = gpu_memory_gb - weights_gb(sd) - WORKSPACE_GB
    invert, edit = per_image_gb(sd, policy, num_edits)
    for what, need in (("the null-text inversion", invert), (f"the editing pass with K = {num_edits}", edit)):
        if free < need:
            raise ValueError(
                f"compute.gpu_memory_gb: {gpu_memory_gb:g} GB cannot hold one image of {what} "
                f"(~{need + gpu_memory_gb - free:.1f} GB with weights and workspace); raise it, or use "
                "inversion.precision=fast/fastest (bf16 edits)"
            )
    return min(inversion_batch, math.floor(free / invert)), min(edit_batch, math.floor(free / edit))
