"""Counterfactual quality metrics: L1, LPIPS (AlexNet, v0.1), CPG and classifier flip rates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from prism_ray.scoring.classification import flipped

# ---------------------------------------------------------------------------------------
# L1
# ---------------------------------------------------------------------------------------


def l1(a: np.ndarray, b: np.ndarray, scale: Literal["unit", "255"] = "unit") -> float | np.ndarray:
    """Mean |I_cf - I_orig| over all pixels and channels of uint8 images.

    `a`, `b`: uint8 arrays, one image (H, W, C) or a batch (N, H, W, C). `scale="unit"` reports
    the error on [0, 1] (PRISM: 0.031), `scale="255"` on [0, 255] (the sister paper: ~15).
    Returns a float for one image and a float64 array of shape (N,) for a batch.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"l1 expects uint8 images, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"l1 images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (3, 4):
        raise ValueError(f"l1 expects (H, W, C) or (N, H, W, C), got shape {a.shape}")
    if scale not in ("unit", "255"):
        raise ValueError(f"scale must be 'unit' or '255', got {scale!r}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if scale == "unit":
        diff /= 255.0
    if a.ndim == 3:
        return float(diff.mean())
    return diff.reshape(diff.shape[0], -1).mean(axis=1)


# ---------------------------------------------------------------------------------------
# LPIPS
# Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
# version 0.1 with the AlexNet trunk. Layer taps, ScalingLayer constants, the channel
# normalisation and the `lin{k}.model.1.weight` key layout follow the public reference
# (github.com/richzhang/PerceptualSimilarity, lpips/lpips.py and lpips/pretrained_networks.py);
# the code here is written on plain torch so that no torchvision is needed.
# ---------------------------------------------------------------------------------------

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
# Indices (in torchvision's alexnet.features) of the five ReLUs whose outputs LPIPS uses.
ALEXNET_TAPS = (1, 4, 7, 9, 11)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (peak 255); inf when they are equal."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean structural similarity of two uint8 images (gray, or RGB averaged to gray).

    Wang et al. 2004 with their constants (K1 = 0.01, K2 = 0.03, L = 255) and an 11-tap Gaussian
    window (sigma 1.5), computed over the valid region (no padding).
    """
    x, y = (np.asarray(im, np.float64) for im in (a, b))
    if x.ndim == 3:
        x, y = x.mean(axis=2), y.mean(axis=2)
    taps = np.arange(11) - 5
    g = np.exp(-(taps**2) / (2 * sigma**2))
    g /= g.sum()

    def blur(z: np.ndarray) -> np.ndarray:  # separable Gaussian, valid region only
        z = np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 1, z)
        return np.apply_along_axis(lambda c: np.convolve(c, g, mode="valid"), 0, z)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


class AlexNetFeatures(nn.Module):
    """AlexNet's convolutional trunk with torchvision's layer indices, so `features.N.*` keys load.

    torchvision's `alexnet().features` ends with a 13th layer (a max-pool at index 12) that
    LPIPS never reads; it has no parameters, so it is left out.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
            nn.ReLU(inplace=False),  # 1  -> tap relu1
            nn.MaxPool2d(kernel_size=3, stride=2),  # 2
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
            nn.ReLU(inplace=False),  # 4  -> tap relu2
            nn.MaxPool2d(kernel_size=3, stride=2),  # 5
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(inplace=False),  # 7  -> tap relu3
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(inplace=False),  # 9  -> tap relu4
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(inplace=False),  # 11 -> tap relu5
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> the five ReLU outputs, [(N, C_k, H_k, W_k)] for C_k in ALEXNET_CHANNELS."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in ALEXNET_TAPS:
                taps.append(x)
        return taps


class LinearHead(nn.Module):
    """LPIPS's learned 1x1 layer. Index 0 stands where the reference trains with dropout (an
    identity at evaluation), so the weight sits at `model.1.weight` as in the official files."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each spatial position's channel vector by its L2 norm (reference: normalize_tensor)."""
    norm = torch.sqrt(torch.sum(x * x, dim=1, keepdim=True))
    return x / (norm + eps)


def _load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a torch pickle with weights_only=True only."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pth", ".pt", ".bin"):
        # Never unpickle arbitrary objects from weight files: tensors only (weights_only=True).
        return torch.load(str(path), map_location="cpu", weights_only=True)
    raise ValueError(f"unsupported weights format {path.suffix!r} for {path}; use .safetensors or .pth")


def uint8_to_lpips_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W), (H, W, C), (N, H, W) or (N, H, W, C) with C in {1, 3} -> float (N, 3, H, W) in [-1, 1].

    A 3-D array is read as one (H, W, C) image when its last axis has 1 or 3 entries, else as
    a batch of grayscale images. Grayscale is replicated to 3 channels.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 2:  # (H, W)
        x = x[None, :, :, None]
    elif x.ndim == 3:
        x = x[None] if x.shape[-1] in (1, 3) else x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected (N, H, W, C) images with C in (1, 3), got shape {tuple(images.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with an AlexNet trunk (lower = more similar).

    Build it with `LPIPS.from_weights(alexnet_path, lpips_path)` for real numbers;
    `LPIPS.random(seed)` gives random weights and exists for tests only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = AlexNetFeatures()
        # Attribute names give the official keys `lin0.model.1.weight` ... `lin4.model.1.weight`.
        for k, c in enumerate(ALEXNET_CHANNELS):
            setattr(self, f"lin{k}", LinearHead(c))
        self.requires_grad_(False)
        self.eval()

    @property
    def lins(self) -> list[LinearHead]:
        return [getattr(self, f"lin{k}") for k in range(len(ALEXNET_CHANNELS))]

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_weights(cls, alexnet_path: str | os.PathLike, lpips_path: str | os.PathLike) -> LPIPS:
        """Load torchvision-layout AlexNet weights (`features.*`; `classifier.*` is ignored) and the
        LPIPS v0.1 linear weights (`lin0.model.1.weight` ... `lin4.model.1.weight`, e.g. the
        reference's `weights/v0.1/alex.pth`), each from .safetensors or .pth."""
        model = cls()
        model.load_trunk_state_dict(_load_state_dict(alexnet_path))
        model.load_linear_state_dict(_load_state_dict(lpips_path))
        return model

    @classmethod
    def random(cls, seed: int = 0) -> LPIPS:
        """Random weights, for tests only: the distances mean nothing perceptually."""
        model = cls()
        g = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                w = torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
                module.weight.copy_(w)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.01)
        for lin in model.lins:  # LPIPS weights are non-negative
            lin.model[1].weight.abs_()
        return model

    def load_trunk_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load `features.N.weight/bias` (torchvision's alexnet keys) into the trunk, strictly."""
        trunk = {k: v for k, v in state_dict.items() if k.startswith("features.")}
        if not trunk:
            raise ValueError("AlexNet state dict has no 'features.*' keys (expected torchvision's layout)")
        missing, unexpected = self.net.load_state_dict(trunk, strict=False)
        if missing or unexpected:
            raise ValueError(f"AlexNet state dict does not match: missing {missing}, unexpected {unexpected}")

    def load_linear_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load `lin{k}.model.1.weight`, shape (1, C_k, 1, 1), non-negative; other keys are ignored."""
        for k, c in enumerate(ALEXNET_CHANNELS):
            key = f"lin{k}.model.1.weight"
            if key not in state_dict:
                raise ValueError(f"LPIPS state dict is missing {key!r}")
            w = state_dict[key]
            if tuple(w.shape) != (1, c, 1, 1):
                raise ValueError(f"{key} has shape {tuple(w.shape)}, expected (1, {c}, 1, 1)")
            if (w < 0).any():
                raise ValueError(f"{key} has negative entries; LPIPS linear weights are non-negative")
            getattr(self, f"lin{k}").model[1].weight.copy_(w)

    # -- computation --------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.shift.device

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Inputs in [-1, 1], (N, 3, H, W) -> the five AlexNet taps after the v0.1 ScalingLayer."""
        return self.net((x - self.shift) / self.scale)

    @torch.no_grad()
    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Distances between two batches in [-1, 1], (N, 3, H, W) each -> (N,)."""
        if x0.shape != x1.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        n = x0.shape[0]
        # One trunk pass over both batches.
        feats = self.features(torch.cat([x0, x1]).to(self.device, self.shift.dtype))
        total = torch.zeros(n, device=self.device, dtype=self.shift.dtype)
        for f, lin in zip(feats, self.lins, strict=True):
            f0, f1 = _unit_normalize(f[:n]), _unit_normalize(f[n:])
            d = lin((f0 - f1) ** 2)  # (N, 1, H_k, W_k)
            total += d.mean(dim=(1, 2, 3))
        return total

    @torch.no_grad()
    def distance(self, a: np.ndarray, b: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """LPIPS between uint8 image batches (see `uint8_to_lpips_input` for shapes) -> float64 (N,)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x0, x1 = uint8_to_lpips_input(a), uint8_to_lpips_input(b)
        if x0.shape != x1.shape:
            raise ValueError(f"LPIPS images differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        out = [
            self(x0[i : i + batch_size], x1[i : i + batch_size]).cpu() for i in range(0, len(x0), batch_size)
        ]
        return torch.cat(out).double().numpy()


# ---------------------------------------------------------------------------------------
# Classifier-based metrics
# ---------------------------------------------------------------------------------------


def _probabilities(p_cf: np.ndarray, p_orig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p_cf, p_orig = np.asarray(p_cf, dtype=np.float64), np.asarray(p_orig, dtype=np.float64)
    if p_cf.shape != p_orig.shape:
        raise ValueError(f"p_cf and p_orig differ in shape: {p_cf.shape} vs {p_orig.shape}")
    if p_cf.size == 0:
        raise ValueError("no edits given (empty probability arrays)")
    for name, p in (("p_cf", p_cf), ("p_orig", p_orig)):
        if not np.all((p >= 0.0) & (p <= 1.0)):
            raise ValueError(f"{name} must hold probabilities in [0, 1]")
    return p_cf, p_orig


def cpg(p_cf: np.ndarray, p_orig: np.ndarray) -> float:
    """Counterfactual prediction gain E|C_A(I_cf) - C_A(I_orig)| over edits, for one attribute A.

    `p_cf`, `p_orig`: the classifier's probability of A, shape (N,). Higher = the edit moved the
    classifier further (across the decision boundary).
    """
    p_cf, p_orig = _probabilities(p_cf, p_orig)
    return float(np.mean(np.abs(p_cf - p_orig)))


def flip_rate(p_cf: np.ndarray, p_orig: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of edits whose decision (p >= threshold) differs between I_cf and I_orig."""
    p_cf, p_orig = _probabilities(p_cf, p_orig)
    return float(np.mean(flipped(p_orig, p_cf, threshold)))


class NonTargetFlips(NamedTuple):
    """`rate`: fraction of edits that change the decision of at least one non-target attribute.
    `per_attribute`: (A,) flip rate of each attribute, NaN at the target index."""

    rate: float
    per_attribute: np.ndarray


def non_target_flip_rate(
    probs_cf: np.ndarray,
    probs_orig: np.ndarray,
    target_index: int,
    threshold: float | np.ndarray = 0.5,
) -> NonTargetFlips:
    """Flip rates of the attributes an edit should preserve (PRISM's "preserving other attributes").

    `probs_cf`, `probs_orig`: (N, A) classifier probabilities; `target_index`: the intervened
    attribute's column; `threshold`: scalar or per-attribute (A,) decision thresholds.
    """
    p_cf, p_orig = _probabilities(probs_cf, probs_orig)
    if p_cf.ndim != 2:
        raise ValueError(f"probs_cf/probs_orig must be (N, A), got shape {p_cf.shape}")
    n_attr = p_cf.shape[1]
    if not 0 <= target_index < n_attr:
        raise ValueError(f"target_index {target_index} out of range for {n_attr} attributes")
    thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n_attr,))
    changed = flipped(p_orig, p_cf, thr)  # (N, A)
    per_attribute = changed.mean(axis=0)
    per_attribute[target_index] = np.nan
    others = np.delete(changed, target_index, axis=1)  # (N, A-1)
    rate = float(others.any(axis=1).mean()) if others.shape[1] else 0.0
    return NonTargetFlips(rate=rate, per_attribute=per_attribute)
