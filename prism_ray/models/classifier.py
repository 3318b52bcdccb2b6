"""The phantom attribute classifier: a tiny transformers ResNet with one sigmoid head per attribute."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

# Head order of the shipped classifier; `id2label` in its config is the source of truth.
CLASSIFIER_LABELS: tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "support_devices",
    "pacemaker",
    "sex_female",
)


def build_classifier(
    labels: tuple[str, ...] = CLASSIFIER_LABELS,
    resolution: int = 64,
    *,
    architecture: Literal["resnet", "efficientnet"] = "resnet",
    embedding_size: int = 16,
    hidden_sizes: tuple[int, ...] = (16, 32, 64, 64),
    depths: tuple[int, ...] = (1, 1, 1, 1),
    width_coefficient: float = 0.25,
    depth_coefficient: float = 0.5,
    dropout_rate: float = 0.0,
):
    """A multi-label image classifier on grayscale images, randomly initialised, one sigmoid head per label.

    `resnet` (default: a small ResNet of about 0.2 M parameters, `embedding_size`, `hidden_sizes`, `depths`)
    or `efficientnet` (transformers' EfficientNet-B0 scaled by `width_coefficient` / `depth_coefficient`).
    """
    from transformers import (
        EfficientNetConfig,
        EfficientNetForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
    )

    heads = {
        "num_labels": len(labels),
        "id2label": {i: name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": "multi_label_classification",
    }
    if architecture == "resnet":
        config = ResNetConfig(
            num_channels=1,
            embedding_size=embedding_size,
            hidden_sizes=list(hidden_sizes),
            depths=list(depths),
            layer_type="basic",
            downsample_in_first_stage=False,
            **heads,
        )
        model_cls = ResNetForImageClassification
    elif architecture == "efficientnet":
        config = EfficientNetConfig(
            num_channels=1,
            image_size=resolution,
            width_coefficient=width_coefficient,
            depth_coefficient=depth_coefficient,
            dropout_rate=dropout_rate,
            **heads,
        )
        # The top conv has round_filters(1280) channels, but its BatchNorm is sized by `hidden_dim`
        # (B7's 2560 by default): keep them equal for a scaled-down network.
        from transformers.models.efficientnet.modeling_efficientnet import round_filters

        config.hidden_dim = round_filters(config, 1280)
        model_cls = EfficientNetForImageClassification
    else:
        raise ValueError(f"architecture: expected 'resnet' or 'efficientnet', got {architecture!r}")
    config.image_size = resolution  # images are resized to this side before the forward pass
    return model_cls(config)


def load_classifier(path: str | Path, device: str | torch.device = "cpu"):
    """Load a saved classifier folder (config.json + model.safetensors); frozen, eval mode.

    Any transformers image-classification architecture loads (the shipped ResNet, the classifier
    job's ResNet or EfficientNet exports).
    """
    from transformers import AutoModelForImageClassification

    folder = Path(path)
    if (folder / "classifier" / "config.json").exists():  # a model family carrying its classifier
        folder = folder / "classifier"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"classifier '{path}': no config.json")
    from prism_ray.models.loading import quiet_progress_bars

    quiet_progress_bars()  # no "Loading weights" bar in a job's output
    model = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True).to(device).eval()
    model.requires_grad_(False)
    return model


def classifier_labels(model) -> list[str]:
    """Head names in output order."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def to_pixels(images: np.ndarray | torch.Tensor, resolution: int, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float (N, 1, R, R) in [-1, 1]; colour images are averaged to gray."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {tuple(x.shape)}")
    x = x.to(device).permute(0, 3, 1, 2).float().mean(dim=1, keepdim=True)  # (N, 1, H, W)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
    return x / 127.5 - 1.0


@torch.no_grad()
def predict_proba(model, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """uint8 images (N, H, W[, C]) -> (N, A) probabilities, columns in `classifier_labels(model)` order."""
    device = next(model.parameters()).device
    resolution = int(getattr(model.config, "image_size", 64))
    out = []
    for i in range(0, len(images), batch_size):
        logits = model(to_pixels(images[i : i + batch_size], resolution, device)).logits
        out.append(torch.sigmoid(logits.float()).cpu())
    if not out:
        raise ValueError("no images given")
    return torch.cat(out).numpy()
