"""The precision policy: which passes of inversion and editing may run in TF32 or bf16 (docs/method.md §13).

One knob, `InversionConfig.precision`, names a preset; `inversion.allow_tf32` and `edit.compute_dtype`
override single fields of it when set. Whatever the preset, the DDIM trajectory, the conditional
prediction of each null-text step, the step that advances the trajectory, Adam and every latent stay
fp32 (TF32 at most): bf16 there compounds over the T steps (a CPU probe on the trained tiny family made
the reconstruction error 30-40x worse), while a bf16 inner step only perturbs a gradient that the next
inner step corrects.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch

from prism_ray.engine.settings import EditConfig, InversionConfig


@dataclass(frozen=True)
class PrecisionPolicy:
    """A resolved preset: TF32 flags for the inversion, autocast dtypes for the null-text inner steps
    and for the editing pass (float32 = no autocast)."""

    name: str
    matmul_tf32: bool  # torch.backends.cuda.matmul.allow_tf32 during inversion
    cudnn_tf32: bool  # torch.backends.cudnn.allow_tf32 during inversion
    inner_dtype: torch.dtype  # the null-text inner steps' U-Net forward/backward (unconditional branch)
    edit_dtype: torch.dtype  # the editing pass, the noise mask and direct inversion's guided pass

    def inner_autocast(self, device: torch.device):
        return autocast(device, self.inner_dtype)

    def edit_autocast(self, device: torch.device):
        return autocast(device, self.edit_dtype)


# "reference" keeps PyTorch's own defaults (cuDNN TF32 on, matmul TF32 off), as the reference notebook ran.
PRESETS = {
    "reference": PrecisionPolicy("reference", False, True, torch.float32, torch.float32),
    "fast": PrecisionPolicy("fast", True, True, torch.float32, torch.bfloat16),
    "fastest": PrecisionPolicy("fastest", True, True, torch.bfloat16, torch.bfloat16),
}


def resolve_precision(
    inversion: InversionConfig, edit: EditConfig | None = None, device: torch.device | str = "cpu"
) -> PrecisionPolicy:
    """The policy for `device`: `auto` is `fast` on CUDA (the fastest preset whose decisions equalled
    fp32's on every phantom-benchmark source, BENCHMARKS.md) and `reference` elsewhere (bf16 on CPU is
    emulated and slow); explicit overrides win over the preset."""
    device = torch.device(device)
    name = inversion.precision
    if name == "auto":
        name = "fast" if device.type == "cuda" else "reference"
    policy = PRESETS[name]
    if inversion.allow_tf32 is not None:
        policy = replace(policy, matmul_tf32=inversion.allow_tf32, cudnn_tf32=inversion.allow_tf32)
    if edit is not None and edit.compute_dtype is not None:
        policy = replace(policy, edit_dtype=getattr(torch, edit.compute_dtype))
    return policy


def autocast(device: torch.device, dtype: torch.dtype):
    """torch.autocast for a reduced dtype, a no-op context for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def tf32_mode(matmul: bool, cudnn: bool | None = None):
    """TF32 matmuls / convolutions on or off for the duration (they change NTI's numbers); restores after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = matmul if cudnn is None else cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
